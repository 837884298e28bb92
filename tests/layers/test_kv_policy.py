"""KV-cache policies: the flag syntax, the caches they build, decoding under them against a
masked dense reference, the memory they report, and generation/evaluation under them.

The reference: the mixer's own parallel pass, with `ops.dot_product_attention` replaced by
a dense float64 softmax whose mask is the causal (and window) mask AND the policy's
(`key < sinks or query - key < window`, per query head for per_head). Decoding under the
policy must reproduce it. (Decoding under the full cache is checked for every mixer by
test_registry.test_decode_reproduces_parallel.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import layers, models, ops
from attn_jax.layers import kv_policy
from attn_jax.models.generate import decode_logits, kv_cache_memory
from tests.layers import util

SEQ = 12  # decoding evicts: every policy below keeps fewer slots


# --- the reference --------------------------------------------------------------------

def _keep_sinks_window(sinks, window):
  return lambda i, j, h: (j < sinks) | (i - j < window)


def _keep_per_head(sinks, window, full_kv_heads, groups):
  streaming = _keep_sinks_window(sinks, window)
  return lambda i, j, h: np.isin(h // groups, full_kv_heads) | streaming(i, j, h)


def _masked_attention(keep):
  """`ops.dot_product_attention` (as the mixers call it, no segments), dense in float32,
  with `keep(query_pos, key_pos, query_head)` ANDed into its mask."""
  def attention(query, key, value, *, scale=None, is_causal=False, local_window_size=None,
                q_segment_ids=None, kv_segment_ids=None, logits_soft_cap=None, sinks=None,
                implementation=None):
    del implementation
    assert q_segment_ids is None and kv_segment_ids is None
    q, k, v = (a.astype(jnp.float32) for a in (query, key, value))
    heads, groups = q.shape[2], q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (q.shape[-1] ** -0.5 if scale is None
                                                     else scale)
    if logits_soft_cap is not None:
      logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    i, j, h = (np.arange(n).reshape(shape) for n, shape in (
        (q.shape[1], (1, -1, 1)), (k.shape[1], (1, 1, -1)), (heads, (-1, 1, 1))))
    mask = keep(i, j, h) & ((j <= i) if is_causal else True)
    if local_window_size is not None:
      left, right = local_window_size
      mask = mask & (i - j <= left) & (j - i <= right)
    logits = jnp.where(mask, logits, -jnp.inf)
    if sinks is not None:
      column = jnp.broadcast_to(sinks.astype(jnp.float32)[:, None, None],
                                logits.shape[:3] + (1,))
      logits = jnp.concatenate([logits, column], axis=-1)
    p = jax.nn.softmax(logits, axis=-1)[..., :k.shape[1]]
    return jnp.einsum("bhqk,bkhd->bqhd", p, v).astype(query.dtype)
  return attention


def _reference(m, x, keep, monkeypatch):
  """The mixer's parallel pass under the masked reference (traced afresh in the patch)."""
  with monkeypatch.context() as patch:
    patch.setattr(ops, "dot_product_attention", _masked_attention(keep))
    return nnx.jit(lambda m, x: m(x))(m, x)


def _filled(abstract, seed):
  """`abstract` (from `nnx.eval_shape`) with random parameters from numpy: no initialiser
  to compile (see util._build); norm scales near 1."""
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    noise = rng.standard_normal(leaf.shape)
    return jnp.asarray(1.0 + 0.1 * noise if name == "scale" else 0.3 * noise, leaf.dtype)
  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@functools.lru_cache(maxsize=None)
def _gqa(name, options=()):
  """`name` with 4 query heads on 2 KV heads (util.build fixes 2 heads)."""
  return _filled(nnx.eval_shape(lambda: layers.make_mixer(
      name, d_model=util.D_MODEL, num_heads=4, num_kv_heads=2, head_dim=4, rngs=nnx.Rngs(0),
      **dict(options))), seed=1)


# --- the policy object and its flag ---------------------------------------------------

def test_flag_strings_round_trip_and_policies_are_hashable():
  for text in ("full", "sinks_window:sinks=4,window=60", "sinks_window:sinks=0,window=1",
               "per_head:sinks=4,window=60,heads=0.1+0.3+1.0",
               "per_head:sinks=4,window=60,heads="):
    policy = kv_policy.parse(text)
    assert str(policy) == text and kv_policy.parse(str(policy)) == policy
  a = kv_policy.parse(" per_head:heads=1.0+0.3+0.1+0.1, window=60,sinks=4 ")
  assert a == kv_policy.per_head(4, 60, {0: [3, 1], 1: [0]})
  assert a == kv_policy.per_head(4, 60, [[1, 3], [0]])
  assert a.full_heads == ((0, (1, 3)), (1, (0,)))
  assert {a: 1}[kv_policy.parse(str(a))] == 1  # hashable: a static jit argument
  assert a.for_layer(0) == kv_policy.LayerCachePolicy("per_head", 4, 60, (1, 3), 0)
  assert a.for_layer(5).full_heads == ()
  assert kv_policy.resolve(None) == kv_policy.full() == kv_policy.resolve("full")


@pytest.mark.parametrize("text, message", [
    ("sliding", "unknown policy 'sliding'"),
    ("full:sinks=1", "full takes no options"),
    ("sinks_window:sinks=4", "sinks_window needs window"),
    ("sinks_window:4,60", "'4' is not NAME=VALUE"),
    ("sinks_window:sinks=4,window=0", "window must be an integer ≥ 1; got '0'"),
    ("sinks_window:sinks=-1,window=4", "sinks must be an integer ≥ 0; got '-1'"),
    ("sinks_window:sinks=4,window=6,heads=0.1",
     "sinks_window takes sinks, window; got 'heads'"),
    ("sinks_window:sinks=1,sinks=2,window=6", "sinks is given twice"),
    ("per_head:sinks=4,window=6", "per_head needs heads"),
    ("per_head:sinks=4,window=6,heads=0-1", "heads item '0-1' is not LAYER.KV_HEAD"),
])
def test_flag_errors_name_the_flag_and_the_syntax(text, message):
  with pytest.raises(ValueError, match="sinks_window:sinks=S,window=W") as error:
    kv_policy.parse(text)
  assert str(error.value).startswith(f"--cache_policy={text!r}: {message}"), error.value


def test_top_full_heads_maps_query_heads_to_kv_heads():
  # Query heads 0-3 read KV heads 0, 0, 1, 1.
  scores = np.array([[0.1, 0.9, 0.0, 0.2],
                     [0.8, 0.05, 0.7, 0.85]])
  assert kv_policy.top_full_heads(scores, 0, num_kv_heads=2) == {}
  assert kv_policy.top_full_heads(scores, 2, num_kv_heads=2) == {0: (0,), 1: (1,)}
  assert kv_policy.top_full_heads(scores, 4, num_kv_heads=2) == {0: (0,), 1: (0, 1)}
  assert kv_policy.top_full_heads(scores, 1) == {0: (1,)}  # MHA: KV head = query head
  policy = kv_policy.per_head(4, 60, kv_policy.top_full_heads(scores, 2, num_kv_heads=2))
  assert str(policy) == "per_head:sinks=4,window=60,heads=0.0+1.1"
  with pytest.raises(ValueError, match="k must be ≤ layers · heads = 8"):
    kv_policy.top_full_heads(scores, 9)
  with pytest.raises(ValueError, match="num_kv_heads .3. must divide"):
    kv_policy.top_full_heads(scores, 1, num_kv_heads=3)


# --- the caches -----------------------------------------------------------------------

def _shapes(cache):
  return jax.tree.map(lambda a: (a.shape, str(a.dtype)), cache)


def test_policies_that_evict_nothing_build_todays_cache():
  softmax, swa = util.build("softmax"), util.build("swa")  # swa: window 3
  today = _shapes(softmax.init_cache(util.BATCH, SEQ))
  for policy in (kv_policy.full(), kv_policy.sinks_window(4, 8),  # 4 + 8 = SEQ: no eviction
                 kv_policy.per_head(1, 2, {0: [0]}).for_layer(0)):  # its one KV head full
    assert _shapes(softmax.init_cache(util.BATCH, SEQ, policy=policy)) == today
  today = _shapes(swa.init_cache(util.BATCH, SEQ))
  policy = kv_policy.sinks_window(1, 3)  # its window covers swa's
  assert _shapes(swa.init_cache(util.BATCH, SEQ, policy=policy)) == today
  lightning = util.build("lightning")  # a recurrent state: accepted and ignored
  assert _shapes(lightning.init_cache(util.BATCH, SEQ, policy=kv_policy.sinks_window(1, 2))
                 ) == _shapes(lightning.init_cache(util.BATCH, SEQ))
  # Based hands the policy to its window branch (an swa mixer, tested above).
  based = util.build("based").init_cache(util.BATCH, SEQ,
                                         policy=kv_policy.sinks_window(1, 1))
  assert based["window"]["slot_pos"].shape == (2,) and "sinks" in based["window"]


@pytest.mark.parametrize("name, options, sinks, window, slots", [
    ("softmax", dict(num_kv_heads=1), 2, 3, 5),                 # MQA
    ("softmax", dict(num_kv_heads=2, sinks=True, logits_soft_cap=2.0), 1, 2, 3),
    ("swa", dict(), 1, 1, 2),  # window 3: the sinks leave the window after 3 tokens
    ("swa", dict(), 2, 2, 3),  # sinks + window > 3: the ring of 3, masked by the policy
    ("mla", dict(), 2, 3, 5),
])
def test_sinks_window_decode_equals_the_masked_reference(name, options, sinks, window,
                                                         slots, monkeypatch):
  m = util.build(name, **options)
  x = util.inputs(seq=SEQ, seed=3)
  cache = m.init_cache(util.BATCH, SEQ, policy=kv_policy.sinks_window(sinks, window))
  assert cache["slot_pos"].shape == (slots,)  # < SEQ: decoding evicts
  y_steps, _ = util.decode_all(m, x, cache)
  want = _reference(m, x, _keep_sinks_window(sinks, window), monkeypatch)
  assert util.rel_err(y_steps, want) < 1e-5


@pytest.mark.parametrize("name, options, full_heads", [
    ("softmax", (("sinks", True),), (1,)),
    ("diff", (("lambda_per_head", True),), (0,)),  # λ per head: taken per group too
])
def test_per_head_decode_equals_the_masked_reference(name, options, full_heads,
                                                     monkeypatch):
  m = _gqa(name, options)  # 4 query heads: heads 2k and 2k + 1 read KV head k
  x = util.inputs(seq=SEQ, seed=4)
  policy = kv_policy.per_head(1, 2, {3: full_heads}).for_layer(3)
  cache = m.init_cache(util.BATCH, SEQ, policy=policy)
  full, streaming = cache["groups"]
  assert full["key"].shape[1:3] == (SEQ, 1) and streaming["key"].shape[1:3] == (3, 1)
  y_steps, _ = util.decode_all(m, x, cache)
  want = _reference(m, x, _keep_per_head(1, 2, full_heads, groups=2), monkeypatch)
  assert util.rel_err(y_steps, want) < 1e-5


def test_per_head_with_every_or_no_head_full_is_full_or_sinks_window():
  # The same cache, so decoding against it is the same computation.
  m = _gqa("softmax")
  for heads, same in (((0, 1), kv_policy.full()), ((), kv_policy.sinks_window(1, 2))):
    cache = m.init_cache(util.BATCH, SEQ, policy=kv_policy.per_head(1, 2, {0: heads}
                                                                     ).for_layer(0))
    want = m.init_cache(util.BATCH, SEQ, policy=same)
    assert _shapes(cache) == _shapes(want)
    jax.tree.map(np.testing.assert_array_equal, cache, want)


def test_bfloat16_sinks_window(monkeypatch):
  m = util.build("softmax", dtype=jnp.bfloat16)
  x = util.inputs(seq=SEQ, seed=6)
  cache = m.init_cache(util.BATCH, SEQ, policy=kv_policy.sinks_window(2, 3))
  assert cache["key"].dtype == jnp.bfloat16 and cache["key"].shape[1] == 5
  y_steps, _ = util.decode_all(m, x, cache)
  assert y_steps.dtype == jnp.bfloat16
  want = _reference(util.build("softmax"), x, _keep_sinks_window(2, 3), monkeypatch)
  assert util.rel_err(y_steps, want) < 0.05


def test_policy_errors():
  per_head = kv_policy.per_head(1, 2, {0: [0]})
  with pytest.raises(ValueError, match="per_head cache policy does not apply to 'mla' "
                                       r"\(layer 0\): its cached latent is shared"):
    util.build("mla").init_cache(util.BATCH, SEQ, policy=per_head.for_layer(0))
  with pytest.raises(ValueError, match=r"pass policy.for_layer\(layer_index\)"):
    util.build("softmax").init_cache(util.BATCH, SEQ, policy=per_head)
  with pytest.raises(ValueError, match=r"KV head\(s\) \[2\] of layer 0 full, but the layer "
                                       "has 2 KV heads"):
    _gqa("softmax").init_cache(util.BATCH, SEQ, policy=kv_policy.per_head(
        1, 2, {0: [0, 2]}).for_layer(0))
  model = _model(["softmax"])
  with pytest.raises(ValueError, match=r"heads of layer\(s\) \[1\] full, but the model has "
                                       "1 layers"):
    model.init_cache(1, SEQ, policy="per_head:sinks=1,window=2,heads=1.0")


# --- models: memory, decode_logits, generate ------------------------------------------

VOCAB = 32


def _model(mixers, dtype=None, **options):
  """A DecoderLM of 4 query heads on 2 KV heads of width 4."""
  return _filled(nnx.eval_shape(lambda: models.DecoderLM(
      vocab_size=VOCAB, d_model=16, num_layers=len(mixers), num_heads=4, mlp_dim=32,
      mixers=mixers, rngs=nnx.Rngs(0), dtype=dtype,
      mixer_options={"all": {"chunk_size": 4}, "softmax": {"num_kv_heads": 2},
                     **options})), seed=2)


@pytest.mark.parametrize("dtype, itemsize", [(None, 4), ("bfloat16", 2)])
def test_memory_is_exact(dtype, itemsize):
  model = _model(["softmax", "softmax", "lightning"], dtype=dtype)
  per_slot = 2 * 3 * 4  # key and value, batch 3, head_dim 4 per KV head
  recurrent = kv_cache_memory(model, batch_size=3, max_len=32)["layer_bytes"][2]
  assert recurrent == 3 * 4 * 4 * 4 * 4  # float32 whatever the policy
  for policy, slots in (
      ("full", [[32, 32], [32, 32]]),
      ("sinks_window:sinks=4,window=8", [[12, 12], [12, 12]]),
      ("per_head:sinks=4,window=8,heads=0.1", [[12, 32], [12, 12]]),
      ("per_head:sinks=4,window=30,heads=1.0", [[32, 32], [32, 32]])):  # evicts nothing
    numbers = [per_slot * sum(layer) for layer in slots]
    report = kv_cache_memory(model, batch_size=3, max_len=32, cache_policy=policy)
    full = 2 * per_slot * 64
    assert report["policy"] == policy
    assert report["numbers"] == sum(numbers) + recurrent // 4
    assert report["layer_bytes"] == [n * itemsize for n in numbers] + [recurrent]
    assert report["bytes"] == sum(numbers) * itemsize + recurrent
    assert report["full_bytes"] == full * itemsize + recurrent
    assert report["fraction_of_full"] == report["bytes"] / report["full_bytes"]


def test_decode_logits_and_generate_under_a_policy():
  model = _model(["softmax"])
  toks = jax.random.randint(jax.random.key(0), (2, SEQ), 0, VOCAB)
  parallel = nnx.jit(lambda model, toks: model(toks))(model, toks)
  policy = "per_head:sinks=1,window=3,heads=0.0"
  logits = decode_logits(model, toks, cache_policy=policy)
  assert logits.shape == (2, SEQ, VOCAB) and logits.dtype == jnp.float32
  # Nothing is evicted before sinks + window = 4 tokens (so decoding equals the parallel
  # pass there, as with the full cache); after that the policy tells.
  np.testing.assert_allclose(logits[:, :4], parallel[:, :4], atol=2e-5, rtol=2e-5)
  assert not np.allclose(logits, parallel, atol=1e-3)
  # Greedy generation under the policy picks the argmax of teacher-forced decoding under it.
  out = models.generate(model, toks[:, :3], max_new_tokens=SEQ - 3, cache_policy=policy)
  np.testing.assert_array_equal(
      out[:, 3:], jnp.argmax(decode_logits(model, out, cache_policy=policy)[:, 2:-1], -1))
