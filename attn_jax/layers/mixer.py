"""The interface every mixer keeps, the KV cache, and the driver of the recurrent mixers.

Every mixer is an `nnx.Module` with

    y = m(x, *, context=None, segment_ids=None, context_segment_ids=None)
    cache = m.init_cache(batch_size, max_len)   # + policy= where CACHE_POLICY is True
    y_t, cache = m.decode(x_t, cache)

`x` is `[batch, seq, d_model]`. Which of the four attention patterns of the Comprehensive
Attention Benchmark (Zhang et al., 2023) a call takes is fixed by the constructor's
`causal` flag and whether `context` is given:

    causal_self      causal=True,  no context   query i sees x[:i+1]
    noncausal_self   causal=False, no context   query i sees all of x
    causal_cross     causal=True,  context      query i sees context[:i+1+offset],
                                                offset = len(context) - len(x)
    noncausal_cross  causal=False, context      query i sees all of context

A mixer lists the patterns its mechanism defines in `PATTERNS`; any other raises a
ValueError naming `causal` or `context`. Decoding is defined for causal self-attention.

Caches are dicts of arrays (pytrees), with the number of tokens seen so far in `"pos"`
(an int32 scalar), so a model can jit a decode step. Mixers with `CACHE_POLICY = True`
take `init_cache(..., policy=)`, a KV-cache policy (`attn_jax.layers.kv_policy`): the
softmax family shrinks its KV cache by it, recurrent mixers (a state that does not grow)
ignore it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax import ops
from attn_jax.layers import kv_policy
from attn_jax.layers.common import check_positive_int, segment_positions

PATTERNS = ("causal_self", "noncausal_self", "causal_cross", "noncausal_cross")


class Mixer(nnx.Module):
  """Base of every mixer: configuration checks and the pattern of a call."""

  NAME = "mixer"
  PATTERNS: tuple[str, ...] = PATTERNS
  CACHE_POLICY = False  # whether init_cache takes a KV-cache policy (policy=)

  def __init__(self, d_model, num_heads, *, causal=True, dtype=None):
    self.d_model = check_positive_int("d_model", d_model)
    self.num_heads = check_positive_int("num_heads", num_heads)
    self.causal = bool(causal)
    self.dtype = None if dtype is None else jnp.dtype(dtype)
    kind = "causal" if self.causal else "noncausal"
    if not any(p.startswith(kind + "_") for p in self.PATTERNS):
      raise ValueError(f"causal={causal} is not supported by {self.NAME!r}: it defines "
                       f"only {', '.join(self.PATTERNS)}.")

  def _head_dim(self, head_dim, divisor=1):
    """`head_dim`, by default `d_model // (num_heads · divisor)` when that divides."""
    if head_dim is not None:
      return check_positive_int("head_dim", head_dim)
    if self.d_model % (self.num_heads * divisor):
      what = "num_heads" if divisor == 1 else f"num_heads · {divisor}"
      raise ValueError(f"{what} ({self.num_heads * divisor}) must divide d_model "
                       f"({self.d_model}), or give head_dim explicitly.")
    return self.d_model // (self.num_heads * divisor)

  def _cast(self, x, name="x"):
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"{name} must be [batch, seq, d_model={self.d_model}]; got shape "
                       f"{x.shape}.")
    return x.astype(self.dtype) if self.dtype is not None else x

  def _pattern(self, x, context, segment_ids, context_segment_ids):
    """Validates a parallel call; returns its pattern name."""
    kind = "causal" if self.causal else "noncausal"
    pattern = kind + ("_self" if context is None else "_cross")
    if pattern not in self.PATTERNS:
      arg = "context" if context is not None else "causal"
      raise ValueError(f"{self.NAME!r} does not define {pattern} attention ({arg} "
                       f"selects it); it defines {', '.join(self.PATTERNS)}.")
    if context is None and context_segment_ids is not None:
      raise ValueError("context_segment_ids needs context.")
    if context is not None and (segment_ids is None) != (context_segment_ids is None):
      raise ValueError("with context, segment_ids and context_segment_ids are given "
                       "together or not at all.")
    for name, ids, seq in (("segment_ids", segment_ids, x.shape[:2]),
                           ("context_segment_ids", context_segment_ids,
                            None if context is None else context.shape[:2])):
      if ids is not None and (jnp.shape(ids) != tuple(seq)
                              or not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer)):
        raise ValueError(f"{name} must be integers of shape {tuple(seq)}; got "
                         f"{jnp.asarray(ids).dtype} {jnp.shape(ids)}.")
    return pattern

  def _sources(self, x, context, segment_ids, context_segment_ids):
    """Validates a parallel call of the softmax family.

    Returns `(x, src, kv_segment_ids, positions)`: the keys' source (x itself, or the
    context), its segment ids, and x's RoPE positions (None for cross attention).
    """
    self._pattern(x, context, segment_ids, context_segment_ids)
    x = self._cast(x)
    if context is None:
      return x, x, segment_ids, segment_positions(segment_ids, *x.shape[:2])
    return x, self._cast(context, "context"), context_segment_ids, None

  def _check_decode(self):
    if "causal_self" not in self.PATTERNS or not self.causal:
      raise ValueError(f"{self.NAME!r} built with causal={self.causal} has no decode "
                       "path: decoding one token at a time needs causal self-attention.")

  def decode_state_size(self, seq_len):
    """Numbers a decoder carries from token to token after `seq_len` tokens.

    Counted from `init_cache(1, seq_len)`: every floating-point array of the cache, so a
    KV cache for attention (2 · seq_len · kv_heads · head_dim), window · 2 · kv_heads ·
    head_dim for a sliding window, the recurrent state for linear attention, the inputs
    so far for a long convolution; short-convolution buffers count too. Positions and
    other integer bookkeeping do not. This is the x-axis of Zoology's and Based's
    recall-vs-state plots, which give bytes as 4 × this number (float32) and leave out
    short-convolution buffers ((size − 1) numbers per channel).
    """
    cache = jax.eval_shape(lambda: self.init_cache(1, seq_len))
    return sum(int(x.size) for x in jax.tree.leaves(cache)
               if jnp.issubdtype(x.dtype, jnp.floating))

  def _cast_step(self, x_t):
    x_t = self._cast(x_t, "x_t")
    if x_t.shape[1] != 1:
      raise ValueError(f"decode takes one token: x_t must be [batch, 1, d_model]; got "
                       f"{x_t.shape}.")
    return x_t


# KV cache: a ring buffer of slots; `slot_pos[j]` is the position held by slot j (-1 while
# empty). A full-attention cache has max_len slots, a sliding-window cache window_size, so
# old entries fall out as new ones arrive. Under a sinks_window policy (`kv_policy`) the
# cache also holds the policy's `sinks` and `window` (int32 scalars): with exactly
# sinks + window slots the first `sinks` slots are pinned to the first tokens and the rest
# is a ring of `window`; with fewer (a window mixer whose own window is the shorter) it is
# the plain ring, and the policy's mask drops what the policy would have evicted. A
# per_head cache is `{"groups": (full, streaming), "pos"}`: two such caches without `pos`,
# each over the KV heads in its `kv_heads` (int32).


class KVView(NamedTuple):
  """One group of a KV cache as a query sees it after `kv_cache_update`.

  Attributes:
    kv_heads: int32 `[group_kv_heads]`, the group's KV heads; None for all, in order.
    entries: the cached arrays by name, `[batch, slots, (group_kv_heads,) ...]`.
    kv_ids: `[batch, slots]` int32, 1 where the query sees the slot, 0 elsewhere; pair it
      with `q_segment_ids = ones([batch, 1])` in `ops.dot_product_attention`.
  """

  kv_heads: jax.Array | None
  entries: dict
  kv_ids: jax.Array


def kv_cache_slots(max_len, window_size, policy):
  """`(slots, masked)`: the slots a cache of `policy` (a `LayerCachePolicy`) needs, and
  whether the policy hides anything the mixer would otherwise see.

  A window mixer sees the last `window_size` tokens; a sinks_window policy keeps the first
  `sinks` and the last `window`; together the query sees what both keep, in
  `min(window_size, max_len, sinks + window)` slots. A policy that never evicts within
  max_len tokens, or whose window covers the mixer's, changes nothing.
  """
  ring = max_len if window_size is None else min(max_len, window_size)
  if policy.is_full:
    return ring, False
  if (policy.sinks + policy.window >= max_len
      or (window_size is not None and policy.window >= window_size)):
    return ring, False
  return min(ring, policy.sinks + policy.window), True


def kv_cache_init(batch_size, max_len, shapes, dtype, *, window_size=None, policy=None,
                  num_kv_heads=None):
  """An empty KV cache for `max_len` tokens.

  Args:
    batch_size, max_len: sequences and tokens to decode.
    shapes: `{name: shape}` of one token's entry; with `num_kv_heads`, each shape starts
      with the KV-head axis (`(kv_heads, head_dim)`).
    dtype: the entries' dtype.
    window_size: the mixer's own window (None: global attention).
    policy: None (full), or what `kv_policy.layer_policy` takes. per_head needs
      `num_kv_heads`; a per_head policy with every KV head full is the full cache, with
      none full the sinks_window cache.
    num_kv_heads: the KV heads of the entries; None when they have none (e.g. MLA's
      latent).

  Returns:
    `{name: zeros [batch, slots, *shape]}`, `slot_pos`, `pos` (and the policy's `sinks`,
    `window`), or for a per_head policy `{"groups": (full, streaming), "pos"}`.
  """
  batch_size = check_positive_int("batch_size", batch_size)
  max_len = check_positive_int("max_len", max_len)
  policy = kv_policy.layer_policy(policy)
  pos = jnp.zeros((), jnp.int32)
  if policy.kind == "per_head":
    if num_kv_heads is None:
      raise ValueError("a per_head cache policy needs KV heads, and this cache has none "
                       f"(its entries are {sorted(shapes)}).")
    policy.check_heads(num_kv_heads)
    streaming = policy.streaming()
    streaming_heads = tuple(h for h in range(num_kv_heads) if h not in policy.full_heads)
    if not policy.full_heads:
      policy = streaming
    elif not streaming_heads or not kv_cache_slots(max_len, window_size, streaming)[1]:
      policy = kv_policy.FULL_LAYER
    else:
      groups = tuple(_group(batch_size, max_len, shapes, dtype, window_size, p, heads)
                     for p, heads in ((kv_policy.FULL_LAYER, policy.full_heads),
                                      (streaming, streaming_heads)))
      return {"groups": groups, "pos": pos}
  cache = _group(batch_size, max_len, shapes, dtype, window_size, policy, None)
  return {**cache, "pos": pos}


def _group(batch_size, max_len, shapes, dtype, window_size, policy, kv_heads):
  slots, masked = kv_cache_slots(max_len, window_size, policy)
  group = {}
  for name, shape in shapes.items():
    shape = tuple(shape) if kv_heads is None else (len(kv_heads),) + tuple(shape)[1:]
    group[name] = jnp.zeros((batch_size, slots) + shape, dtype)
  group["slot_pos"] = jnp.full((slots,), -1, jnp.int32)
  if masked:
    group["sinks"] = jnp.asarray(policy.sinks, jnp.int32)
    group["window"] = jnp.asarray(policy.window, jnp.int32)
  if kv_heads is not None:
    group["kv_heads"] = jnp.asarray(kv_heads, jnp.int32)
  return group


def kv_cache_update(cache, entries, *, window_size=None):
  """Writes one token's `entries` (`{name: [batch, 1, ...]}`) into the cache.

  Args:
    cache: from `kv_cache_init`.
    entries: the new token's arrays, with the cache's names and the full KV-head axis.
    window_size: the mixer's own window (None: global), which a policy cache masks.

  Returns:
    The new cache and a list of `KVView`s, one per group (one for full and sinks_window
    caches).
  """
  pos = cache["pos"]
  batch = next(iter(entries.values())).shape[0]

  def view(group, visible, kv_heads):
    ids = jnp.broadcast_to(visible.astype(jnp.int32), (batch, visible.shape[0]))
    return KVView(kv_heads, {name: group[name] for name in entries}, ids)

  if "groups" in cache:
    groups, views = [], []
    for group in cache["groups"]:
      heads = group["kv_heads"]
      group, visible = _write(group, {n: jnp.take(e, heads, axis=2) for n, e in
                                      entries.items()}, pos, window_size)
      groups.append(group)
      views.append(view(group, visible, heads))
    return {"groups": tuple(groups), "pos": pos + 1}, views
  new, visible = _write(cache, entries, pos, window_size)
  new["pos"] = pos + 1
  return new, [view(new, visible, None)]


def _write(group, entries, pos, window_size):
  """Writes token `pos` into one group; returns it and the slots it sees (`[slots]`)."""
  slot_pos = group["slot_pos"]
  slots = slot_pos.shape[0]
  if "sinks" in group:
    sinks, window = group["sinks"], group["window"]
    pinned = jnp.where(sinks + window == slots, sinks, 0)
    slot = jnp.where(pos < pinned, pos, pinned + (pos - pinned) % (slots - pinned))
  else:
    slot = pos % slots
  new = dict(group)
  for name, value in entries.items():
    new[name] = jax.lax.dynamic_update_slice_in_dim(
        group[name], value.astype(group[name].dtype), slot, axis=1)
  held = new["slot_pos"] = slot_pos.at[slot].set(pos)
  visible = held >= 0
  if "sinks" in group:
    age = pos - held
    visible &= (held < sinks) | (age < window)
    if window_size is not None:
      visible &= age < window_size
  return new, visible


def attend_views(q, views, num_kv_heads, attend):
  """Attention of `q [batch, 1, heads, ...]` over each view; outputs in head order.

  `attend(q_group, view, q_heads)` returns `[batch, 1, group_heads, ...]` for the query
  heads `q_heads` (int32, None for all) of a view; query head h reads KV head
  `h // (heads // num_kv_heads)`, so a group of KV heads K serves query heads
  `k · g + j` (k in K, j < g) in that order, and keeps GQA's mapping inside the group.
  """
  if len(views) == 1 and views[0].kv_heads is None:
    return attend(q, views[0], None)
  group = q.shape[2] // num_kv_heads
  outs, heads = [], []
  for view in views:
    q_heads = (view.kv_heads[:, None] * group + jnp.arange(group, dtype=jnp.int32)
               ).reshape(-1)
    outs.append(attend(jnp.take(q, q_heads, axis=2), view, q_heads))
    heads.append(q_heads)
  o = jnp.concatenate(outs, axis=2)
  return jnp.zeros_like(o).at[:, :, jnp.concatenate(heads)].set(o)


class LinearAttentionInputs(NamedTuple):
  """What a recurrent mixer's `_inputs` hands to `ops.linear_attention` and `_output`.

  Attributes:
    query: `[batch, seq, heads, key_dim]`, from x (feature maps applied).
    key: `[batch, src_seq, heads, key_dim]`, from the source (x, or the context).
    value: `[batch, src_seq, value_heads, value_dim]`, from the source.
    conv_state: the short convolutions' decode state after this token (a dict), or None
      in the parallel path.
    log_decay: None, `[value_heads]` float32 (fixed per head), `[batch, src_seq,
      value_heads]` or `[batch, src_seq, value_heads, key_dim]` float32 (gates), ≤ 0.
    output_aux: whatever `_output` needs besides o and x (Mamba-2's skip input), or None.
  """

  query: jax.Array
  key: jax.Array
  value: jax.Array
  conv_state: dict | None
  log_decay: jax.Array | None = None
  output_aux: Any = None


class RecurrentMixer(Mixer):
  """Driver of the linear-attention family: parallel form, decode step and cross patterns.

  A subclass defines `_inputs` (projections, convolution, feature maps, decay) and
  `_output` (norm, gate, output projection); this class runs `ops.linear_attention`
  (parallel) or `ops.linear_attention_step` (decode) between them. The decode state is
  `[batch, value_heads, key_dim, value_dim (+1 with normalize)]` float32, whatever the
  length decoded.

  Args (the options the recurrent mixers share, besides d_model, num_heads, causal, dtype):
    short_conv_size: None, or the width of the causal short convolution a subclass puts
      on its projections; checked and kept as `self.short_conv_size`.
    normalize: divide by `scale · qᵀ Σ k` (Katharopoulos et al.), as `ops.linear_attention`.
    scale: logit scale; None for the op's default, `key_dim^-0.5`.
    chunk_size, implementation: passed to `ops.linear_attention`.
  """

  PATTERNS = ("causal_self", "causal_cross")
  CACHE_POLICY = True
  convs = None  # an nnx.Dict of ShortConv, or None

  def __init__(self, d_model, num_heads, *, causal=True, short_conv_size=None,
               normalize=False, scale=None, chunk_size=64, implementation=None, dtype=None):
    super().__init__(d_model, num_heads, causal=causal, dtype=dtype)
    self.short_conv_size = check_positive_int("short_conv_size", short_conv_size,
                                              allow_none=True)
    self.normalize, self.scale = bool(normalize), scale
    self.chunk_size = check_positive_int("chunk_size", chunk_size)
    self.implementation = implementation

  def _inputs(self, x, src, *, positions, segment_ids, conv_state):
    """Returns the `LinearAttentionInputs` of a call.

    q from `x`, k, v and log_decay from `src` (x itself, or the context).
    `positions [batch, seq]` is None in cross attention; `conv_state` is None in the
    parallel path.
    """
    raise NotImplementedError

  def _output(self, o, x, aux):
    """Maps `o [batch, seq, value_heads, value_dim]` to `[batch, seq, d_model]`."""
    raise NotImplementedError

  def _state_shape(self):
    """`(value_heads, key_dim, value_dim)` of the recurrent state."""
    raise NotImplementedError

  def _conv(self, name, x, segment_ids, conv_state):
    """Applies `self.convs[name]` when there is one, threading its decode state."""
    if self.convs is None or name not in self.convs:
      return x, conv_state
    y, new = self.convs[name](x, segment_ids=segment_ids,
                              state=None if conv_state is None else conv_state[name])
    if conv_state is not None:
      conv_state = {**conv_state, name: new}
    return y, conv_state

  def _conv_qkv(self, x, src, segment_ids, conv_state):
    """query(x), key(src), value(src), each through its short convolution if any."""
    q, conv_state = self._conv("q", self.query(x), segment_ids, conv_state)
    k, conv_state = self._conv("k", self.key(src), segment_ids, conv_state)
    v, conv_state = self._conv("v", self.value(src), segment_ids, conv_state)
    return q, k, v, conv_state

  def __call__(self, x, *, context=None, segment_ids=None, context_segment_ids=None):
    """The parallel form; `x [batch, seq, d_model]` → `[batch, seq, d_model]`."""
    pattern = self._pattern(x, context, segment_ids, context_segment_ids)
    x = self._cast(x)
    batch, seq = x.shape[:2]
    if context is None:
      src, positions = x, segment_positions(segment_ids, batch, seq)
    else:
      src, positions = self._cast(context, "context"), None
      if segment_ids is not None:
        raise ValueError(f"{self.NAME!r} takes no segment_ids in cross attention (packed "
                         "cross attention is served by the softmax mixers).")
      if pattern == "causal_cross" and src.shape[1] != seq:
        raise ValueError(f"causal cross attention in {self.NAME!r} pairs query i with "
                         f"context token i: context must have the length of x ({seq}); "
                         f"got {src.shape[1]}.")
    inputs = self._inputs(x, src, positions=positions, segment_ids=segment_ids,
                          conv_state=None)
    o = ops.linear_attention(inputs.query, inputs.key, inputs.value,
                             log_decay=inputs.log_decay, scale=self.scale,
                             is_causal=self.causal, normalize=self.normalize,
                             segment_ids=segment_ids, chunk_size=self.chunk_size,
                             implementation=self.implementation)
    return self._output(o, x, inputs.output_aux)

  def init_cache(self, batch_size, max_len=None, policy=None):
    """The recurrent state (`max_len` and the KV-cache `policy` are ignored: the state
    does not grow)."""
    self._check_decode()
    batch_size = check_positive_int("batch_size", batch_size)
    value_heads, key_dim, value_dim = self._state_shape()
    state_dim = value_dim + int(self.normalize)
    conv = {}
    if self.convs is not None:
      conv = {name: c.init_state(batch_size, self.dtype or jnp.float32)
              for name, c in self.convs.items()}
    return {"state": jnp.zeros((batch_size, value_heads, key_dim, state_dim), jnp.float32),
            "conv": conv, "pos": jnp.zeros((), jnp.int32)}

  def decode(self, x_t, cache):
    """One token: `x_t [batch, 1, d_model]` → `(y_t [batch, 1, d_model], new cache)`."""
    self._check_decode()
    x_t = self._cast_step(x_t)
    positions = jnp.broadcast_to(cache["pos"], (x_t.shape[0], 1))
    inputs = self._inputs(x_t, x_t, positions=positions, segment_ids=None,
                          conv_state=cache["conv"])
    log_decay = inputs.log_decay
    if log_decay is not None and log_decay.ndim > 1:
      log_decay = log_decay[:, 0]
    o, state = ops.linear_attention_step(
        cache["state"], inputs.query[:, 0], inputs.key[:, 0], inputs.value[:, 0],
        log_decay=log_decay, scale=self.scale, normalize=self.normalize)
    y = self._output(o[:, None], x_t, inputs.output_aux)
    return y, {"state": state, "conv": inputs.conv_state, "pos": cache["pos"] + 1}
