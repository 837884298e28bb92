"""The decoder LM: decoding against caches equals the parallel pass, packing, remat,
dtypes, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import models
from tests.utils import rel_err

VOCAB, SEQ = 64, 12
PATTERNS = {
    "softmax": ["softmax"],
    "hybrid": ["lightning", "softmax"],      # MiniMax-style
    "griffin": ["hgrn2", "swa"],             # recurrent + local attention
}


def make(mixers, **kwargs):
  options = {"all": {"chunk_size": 4}, "swa": {"window_size": 4}}
  kwargs = {"vocab_size": VOCAB, "d_model": 32, "num_layers": 2, "num_heads": 4,
            "mlp_dim": 64, "mixers": mixers, "rngs": nnx.Rngs(0),
            "mixer_options": options, **kwargs}
  return models.DecoderLM(**kwargs)


def tokens(batch=2, seq=SEQ, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, VOCAB)


@jax.jit
def forward(graphdef, state, toks, segment_ids=None):
  return nnx.merge(graphdef, state)(toks, segment_ids)


@jax.jit
def _decode_all(graphdef, state, toks):
  model = nnx.merge(graphdef, state)

  def feed(caches, token):
    logits, caches = model.decode(token[:, None], caches)
    return caches, logits[:, 0]

  _, logits = jax.lax.scan(feed, model.init_cache(toks.shape[0], toks.shape[1]), toks.T)
  return jnp.moveaxis(logits, 0, 1)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_decode_with_caches_equals_parallel_pass(pattern):
  model = make(PATTERNS[pattern])
  toks = tokens()
  parallel = forward(*nnx.split(model), toks)
  decoded = _decode_all(*nnx.split(model), toks)
  assert parallel.shape == (2, SEQ, VOCAB) and parallel.dtype == jnp.float32
  np.testing.assert_allclose(decoded, parallel, atol=2e-4, rtol=2e-4)


def test_generation_greedy_and_sampled():
  model = make(["softmax"])
  prompts = tokens(seq=4)
  out = models.generate(model, prompts, max_new_tokens=6)
  assert out.shape == (2, 10) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out[:, :4], prompts)
  # Greedy: every new token is the argmax of the parallel pass over what precedes it.
  logits = forward(*nnx.split(model), out)
  np.testing.assert_array_equal(out[:, 4:], jnp.argmax(logits[:, 3:-1], axis=-1))
  one = models.generate(model, prompts, max_new_tokens=6, temperature=1.0, top_k=1)
  np.testing.assert_array_equal(one, out)  # top-1 sampling is greedy
  key = jax.random.key(3)
  a = models.generate(model, prompts, max_new_tokens=6, temperature=2.0, rng=key)
  b = models.generate(model, prompts, max_new_tokens=6, temperature=2.0, rng=key)
  c = models.generate(model, prompts, max_new_tokens=6, temperature=2.0,
                      rng=jax.random.key(4))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert int(a.min()) >= 0 and int(a.max()) < VOCAB
  with pytest.raises(ValueError, match="temperature"):
    models.generate(model, prompts, max_new_tokens=2, temperature=-1.0)


def test_packed_rows_equal_separate_documents():
  model = make(["lightning", "softmax"])
  first, second = tokens(1, 5, seed=2), tokens(1, 7, seed=3)
  packed = jnp.concatenate([first, second], axis=1)
  ids = jnp.array([[1] * 5 + [2] * 7])
  graphdef, state = nnx.split(model)
  logits = forward(graphdef, state, packed, ids)
  np.testing.assert_allclose(logits[:, :5], forward(graphdef, state, first), atol=1e-4)
  np.testing.assert_allclose(logits[:, 5:], forward(graphdef, state, second), atol=1e-4)


def test_remat_and_mixed_precision():
  toks = tokens()

  def loss_and_grads(model):
    graphdef, params = nnx.split(model)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(toks) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  loss, grads = loss_and_grads(make(["softmax"]))
  remat_loss, remat_grads = loss_and_grads(make(["softmax"], remat="full"))
  assert abs(float(remat_loss) - float(loss)) <= 1e-6 * abs(float(loss))
  assert max(jax.tree.leaves(jax.tree.map(rel_err, remat_grads, grads))) <= 1e-5

  bf16 = make(["softmax"], dtype="bfloat16")
  params = jax.tree.leaves(nnx.state(bf16, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  logits = forward(*nnx.split(bf16), toks)
  assert logits.dtype == jnp.float32
  assert rel_err(logits, forward(*nnx.split(make(["softmax"])), toks)) <= 3e-2


def test_mixer_pattern_and_options():
  model = make(["lightning", "lightning", "softmax"], num_layers=6)
  assert model.mixers == ("lightning", "lightning", "softmax") * 2
  # Lightning's decays depend on the layer: the model passes layer_index and num_layers.
  from attn_jax.layers.lightning import lightning_log_decay
  assert model.blocks[3].mixer.log_decays == lightning_log_decay(4, 3, 6)
  assert model.blocks[0].mixer.log_decays != model.blocks[3].mixer.log_decays
  with pytest.raises(ValueError, match="divide num_layers"):
    make(["softmax", "gla"], num_layers=3)
  with pytest.raises(ValueError, match="unknown mixer 'nope'"):
    make(["nope"])
  with pytest.raises(ValueError, match="remat"):
    make(["softmax"], remat="sometimes")
  with pytest.raises(ValueError, match="'softmax'.*windw_size"):
    make(["softmax"], mixer_options={"softmax": {"windw_size": 3}})
  untied = make(["softmax"], tie_embeddings=False)
  assert untied.head.kernel.shape == (32, VOCAB)
  assert jax.eval_shape(untied, tokens()).shape == (2, SEQ, VOCAB)


def _dot_operand_dtypes(fn, *args):
  """The operand dtypes of every dot_general in fn's jaxpr, inner jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(tuple(v.aval.dtype.name for v in eqn.invars))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
          inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_logits_matmul_backward_runs_in_the_operands_dtype():
  """Tied-embedding logits: float32 forward, and a backward whose two matmuls take bf16
  operands (plain autodiff promoted them to float32); gradients match float32."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  table = jax.random.normal(jax.random.key(1), (40, 16))
  d_logits = jax.random.normal(jax.random.key(2), (2, 5, 40))
  loss = lambda f: (lambda x, t: jnp.sum(f(x, t) * d_logits))
  plain = lambda x, t: jnp.einsum("bsd,vd->bsv", x, t, preferred_element_type=jnp.float32)
  for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
    args = (x.astype(dtype), table.astype(dtype))
    out = models.blocks.logits_matmul(*args)
    assert out.dtype == jnp.float32
    assert rel_err(out, plain(x, table)) < tol
    grads = jax.grad(loss(models.blocks.logits_matmul), argnums=(0, 1))(*args)
    expected = jax.grad(loss(plain), argnums=(0, 1))(x, table)
    for g, e in zip(grads, expected):
      assert g.dtype == dtype and rel_err(g, e) < tol
    dots = _dot_operand_dtypes(jax.grad(loss(models.blocks.logits_matmul), argnums=(0, 1)),
                               *args)
    assert len(dots) == 3 and all(d == (jnp.dtype(dtype).name,) * 2 for d in dots), dots
