"""`linear_attention` and `linear_attention_step`: linear attention with decays and gates.

One recurrence covers the family (Katharopoulos et al. 2020; Lightning Attention-2,
Qin et al. 2024; RetNet, Sun et al. 2023; GLA, Yang et al. 2024; Mamba-2 SSD, Dao & Gu
2024; HGRN2, Qin et al. 2024):

  S_t = a_t ⊙ S_{t-1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t,   a_t = exp(log_decay).

Implementations: every backend is in `pallas_kernels.linear_attention`: "xla"
(`xla_chunked`, the chunked form in plain XLA, everywhere) and the kernels. This module
checks the arguments and dispatches through the table `BACKENDS` at the end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from attn_jax.ops import dispatch
from attn_jax.ops.checks import check_qkv, segment_ids_int32
from attn_jax.ops.nonfinite_guard import guard_linear

NORMALIZE_EPS = 1e-6


def linear_attention(query, key, value, *, log_decay=None, scale=None, is_causal=True,
                     normalize=False, initial_state=None, return_final_state=False,
                     segment_ids=None, chunk_size=64, implementation=None):
  """Linear attention over a sequence, by the recurrence above.

  Args:
    query, key: `[batch, seq, heads, key_dim]` (feature maps already applied). With
      `is_causal=False` and no segment_ids the query may have its own length
      (`[batch, q_seq, heads, key_dim]`: non-causal cross attention, every query reads the
      state of the whole key sequence).
    value: `[batch, seq, value_heads, value_dim]`; value_heads is a multiple of heads
      (Mamba-2/GQA style: query/key head h serves value heads
      `h * r ... (h + 1) * r - 1`, r = value_heads // heads). Outputs have value_heads.
    log_decay: None (no decay); `[value_heads]` fixed per-head decay (Lightning,
      TransNormer, RetNet); `[batch, seq, value_heads]` per-token scalar gate (simple GLA,
      Mamba-2); or `[batch, seq, value_heads, key_dim]` per-token gate over keys (GLA,
      HGRN2). Values must be ≤ 0 (a_t ≤ 1) and finite: concrete values that are not
      raise ValueError; under jit a positive value turns into NaN (in every output it
      reaches), since a traced value cannot raise.
    scale: None means `key_dim ** -0.5`.
    is_causal: False gives global (non-causal) linear attention: every token reads the
      state of its whole segment; no decay is allowed then.
    normalize: divide by `scale · qᵀ z_t + eps`, z_t the same recurrence over keys
      (Katharopoulos-style; use positive feature maps). The state then carries z as an
      extra last value column: `[batch, value_heads, key_dim, value_dim + 1]`.
    initial_state: `[batch, value_heads, key_dim, value_dim(+1)]` float32, the state
      before the first token; it reaches the first segment only.
    return_final_state: also return the state after the last token (float32).
    segment_ids: `[batch, seq]` integers; the state restarts from zero where the id
      changes from one token to the next (packed sequences).
    chunk_size: tokens per chunk of the chunked form.
    implementation: None picks the fastest that serves the call; or "xla",
      "pallas_mosaic_gpu", "triton", "pallas_triton", "pallas_tpu".

  Returns:
    `[batch, q_seq, value_heads, value_dim]` in the query's dtype, and the final state
    with `return_final_state`.
  """
  query, key, value = (jnp.asarray(x) for x in (query, key, value))
  cross = query.ndim == key.ndim == 4 and query.shape[1] != key.shape[1]
  if cross and (is_causal or segment_ids is not None):
    raise ValueError(
        f"query has {query.shape[1]} tokens and key {key.shape[1]}: different lengths "
        f"need is_causal=False and no segment_ids (non-causal cross attention); got "
        f"is_causal={is_causal}, segment_ids {'given' if segment_ids is not None else 'None'}.")
  check_qkv(query, key, value, grouped="value")
  batch, seq, heads, key_dim = key.shape
  value_heads, value_dim = value.shape[2:]
  state_dim = value_dim + int(bool(normalize))
  if log_decay is not None:
    log_decay = _check_log_decay(log_decay, batch, seq, value_heads, key_dim, token_axis=True)
    if not is_causal:
      raise ValueError("log_decay must be None when is_causal=False: a decay orders the "
                       "tokens, so non-causal linear attention has none.")
  if initial_state is not None:
    initial_state = _check_state("initial_state", initial_state,
                                 (batch, value_heads, key_dim, state_dim), normalize)
  if segment_ids is not None:
    segment_ids, = segment_ids_int32(("segment_ids", segment_ids, (batch, seq)))
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
  scale = key_dim ** -0.5 if scale is None else float(scale)

  if normalize:
    ones = jnp.ones(value.shape[:-1] + (1,), value.dtype)
    value = jnp.concatenate([value, ones], axis=-1)
  if initial_state is None:
    initial_state = jnp.zeros((batch, value_heads, key_dim, state_dim), jnp.float32)
  resets = _resets(segment_ids, batch, seq)
  # Fixed decays and "no segment ids" are compile-time constants; every path takes
  # cumulative sums of their per-token broadcasts, which XLA would otherwise evaluate while
  # compiling (seen on an H100: 8-12 s per sum at a million elements).
  log_decay, resets = lax.optimization_barrier((log_decay, resets))
  kwargs = dict(scale=scale, chunk_size=int(chunk_size))
  if is_causal:
    out, final = dispatch.dispatch(
        "linear_attention", BACKENDS, implementation,
        query, key, value, log_decay, initial_state, resets, **kwargs)
  else:
    out, final = _non_causal(query, key, value, initial_state, resets, segment_ids,
                             implementation, kwargs)
  if normalize:
    out = out[..., :value_dim] / (out[..., value_dim:] + NORMALIZE_EPS)
  out = out.astype(query.dtype)
  return (out, final) if return_final_state else out


def linear_attention_step(state, query, key, value, *, log_decay=None, scale=None,
                          normalize=False):
  """One token of linear attention: the decoding form of `linear_attention`.

  Args:
    state: `[batch, value_heads, key_dim, value_dim (+1 with normalize)]` float32.
    query, key: `[batch, heads, key_dim]`; value: `[batch, value_heads, value_dim]`.
    log_decay: None, `[value_heads]`, `[batch, value_heads]` or
      `[batch, value_heads, key_dim]`, ≤ 0.
    scale: None means `key_dim ** -0.5`.
    normalize: as `linear_attention`: divide by `scale · qᵀ z_t + eps`, z_t (the key sum)
      carried as the state's extra last value column.

  Returns:
    `(out [batch, value_heads, value_dim] in the query's dtype, new_state float32)`.
  """
  query, key, value = (jnp.asarray(x) for x in (query, key, value))
  check_qkv(query, key, value, grouped="value", step=True)
  batch, heads, key_dim = key.shape
  value_heads, value_dim = value.shape[1:]
  state_dim = value_dim + int(bool(normalize))
  state = _check_state("state", state, (batch, value_heads, key_dim, state_dim), normalize)
  scale = key_dim ** -0.5 if scale is None else float(scale)
  if normalize:
    value = jnp.concatenate([value, jnp.ones(value.shape[:-1] + (1,), value.dtype)], -1)
  q, k = (_expand_heads(x.astype(jnp.float32), value_heads // heads, axis=1)
          for x in (query, key))
  new_state = state
  if log_decay is not None:
    log_decay = _check_log_decay(log_decay, batch, 1, value_heads, key_dim, token_axis=False)
    decay = jnp.exp(log_decay.astype(jnp.float32))
    decay = decay[..., None] if decay.ndim < 3 else decay  # [.., heads, 1|key_dim]
    new_state = decay[..., None] * new_state
  new_state = new_state + k[..., None] * value.astype(jnp.float32)[..., None, :]
  out = scale * jnp.einsum("bhkv,bhk->bhv", new_state, q)
  if normalize:
    out = out[..., :value_dim] / (out[..., value_dim:] + NORMALIZE_EPS)
  return out.astype(query.dtype), new_state


def _non_causal(query, key, value, initial_state, resets, segment_ids, implementation,
                kwargs):
  """Global linear attention: o_i = scale · qᵢᵀ (state of i's whole segment).

  Without segments it is one sum. With segments it is a causal pass plus a causal pass
  over the reversed sequence, less the token's own term counted twice.
  """
  if segment_ids is None:
    q, k = (_expand_heads(x.astype(jnp.float32), value.shape[2] // key.shape[2], axis=2)
            for x in (query, key))
    final = initial_state + jnp.einsum("bthk,bthv->bhkv", k, value.astype(jnp.float32))
    return kwargs["scale"] * jnp.einsum("bthk,bhkv->bthv", q, final), final
  run = lambda *a: dispatch.dispatch("linear_attention", BACKENDS, implementation, *a,
                                     **kwargs)
  forward, final = run(query, key, value, None, initial_state, resets)
  flip = lambda x: jnp.flip(x, axis=1)
  backward_resets = flip(_resets(flip(segment_ids), *segment_ids.shape))
  backward, _ = run(flip(query), flip(key), flip(value), None,
                    jnp.zeros_like(initial_state), flip(backward_resets))
  q, k = (_expand_heads(x.astype(jnp.float32), value.shape[2] // key.shape[2], axis=2)
          for x in (query, key))
  own = kwargs["scale"] * jnp.sum(q * k, -1, keepdims=True) * value.astype(jnp.float32)
  return forward + flip(backward) - own, final


def _resets(segment_ids, batch, seq):
  """`[batch, seq]` bool: True where a new segment starts (never at token 0)."""
  if segment_ids is None:
    return jnp.zeros((batch, seq), bool)
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros((batch, 1), bool), change], axis=1)


def _expand_heads(x, repeats, axis):
  return x if repeats == 1 else jnp.repeat(x, repeats, axis=axis)


def _check_log_decay(log_decay, batch, seq, heads, key_dim, token_axis):
  log_decay = jnp.asarray(log_decay)
  if token_axis:
    forms = {(heads,): "fixed per head", (batch, seq, heads): "per-token scalar gate",
             (batch, seq, heads, key_dim): "per-token vector gate"}
  else:
    forms = {(heads,): "fixed per head", (batch, heads): "per-token scalar gate",
             (batch, heads, key_dim): "per-token vector gate"}
  if log_decay.shape not in forms:
    expected = ", ".join(f"{s} ({name})" for s, name in forms.items())
    raise ValueError(f"log_decay has shape {log_decay.shape}, which fits no decay form; "
                     f"expected one of {expected}.")
  if not jnp.issubdtype(log_decay.dtype, jnp.floating):
    raise ValueError(f"log_decay must be floating point; got {log_decay.dtype}.")
  try:
    concrete = np.asarray(log_decay)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    # Traced (under jit) the values cannot raise: a positive one becomes NaN, so the
    # mistake shows in every output that it reaches (not a silently growing state).
    return jnp.where(log_decay > 0, jnp.nan, log_decay)
  if np.any(concrete > 0) or not np.all(np.isfinite(concrete)):
    raise ValueError(f"log_decay must be finite and ≤ 0 (decay a = exp(log_decay) ≤ 1); "
                     f"got max {np.nanmax(concrete)}, min {np.nanmin(concrete)}.")
  return log_decay


def _check_state(name, state, shape, normalize):
  state = jnp.asarray(state)
  if state.shape != shape:
    extra = " (normalize=True adds the normaliser column)" if normalize else ""
    raise ValueError(f"{name} must have shape [batch, value_heads, key_dim, value_dim] = "
                     f"{shape}{extra}; got {state.shape}.")
  return state.astype(jnp.float32)


_STATIC_ARGS = ("scale", "chunk_size", "interpret")


def _kernel(entry):
  """A kernel's `linear_attention` as the op calls it: through one shared jit
  (`dispatch.traced_once`), guarded against non-finite inputs (`nonfinite_guard`)."""
  return guard_linear(dispatch.traced_once(entry, _STATIC_ARGS))


# pylint: disable=g-import-not-at-top  (a kernel is imported when it first runs)


def _xla():
  from pallas_kernels.linear_attention import xla_chunked
  return xla_chunked.linear_attention


def _pallas_mosaic_gpu():
  return _kernel(_mosaic_gpu_linear_attention)


def _mosaic_gpu_linear_attention(query, key, value, log_decay, initial_state, resets, *,
                                 scale, chunk_size, interpret=False, block_sizes=None):
  """`pallas_mosaic_gpu.linear_attention`; a vector gate there also runs Triton-language
  kernels (its backward, and its forward where a chunk's decay is too steep to factor),
  which refuse the call as `triton` does where they cannot run."""
  from pallas_kernels.linear_attention import pallas_mosaic_gpu
  if log_decay is not None and log_decay.ndim == 4:
    dispatch.import_triton_kernels(
        "pallas_kernels.linear_attention.pallas_mosaic_gpu_vector",
        user="implementation='pallas_mosaic_gpu' with a vector gate (its backward is the "
        "Triton-language kernels')")
  return pallas_mosaic_gpu.linear_attention(
      query, key, value, log_decay, initial_state, resets, scale=scale,
      chunk_size=chunk_size, interpret=interpret, block_sizes=block_sizes)


def _pallas_triton():
  from pallas_kernels.linear_attention import pallas_triton
  return _kernel(pallas_triton.linear_attention)


def _triton():
  triton = dispatch.import_triton_kernels("pallas_kernels.linear_attention.triton")
  return _kernel(triton.linear_attention)


def _pallas_tpu():
  from pallas_kernels.linear_attention import pallas_tpu
  return _kernel(pallas_tpu.linear_attention)


# On Hopper the Mosaic GPU kernels serve fixed and scalar decays in 16-bit and vector
# gates in bf16 (measured faster than the Triton ones: docs/perf/linear_attention.md;
# vector gate 1.24-1.27x `triton` forward, 1.16-1.18x forward + backward,
# docs/perf/runs/2026-12-08-h100-mosaic-vector.md); they refuse other GPUs, f32 and f16
# vector gates, which fall through to "triton" (jax-triton), ahead of "pallas_triton" (the
# Pallas Triton lowering JAX 0.11 deprecates): on the H100 (issue 20,
# docs/perf/runs/2026-12-08-h100-triton-vs-pallas-triton-whole-calls.md) fixed and scalar
# decay forward + backward 1.19-1.42x Pallas-Triton's speed (forward 1.12x at 1k, 0.88x
# at 64k); the vector gate 0.91-0.95x. Training is what researchers run, so triton leads;
# pallas_triton serves where jax-triton does not import.
BACKENDS = (
    dispatch.Backend("xla", "any", _xla),
    dispatch.Backend("pallas_mosaic_gpu", "gpu", _pallas_mosaic_gpu),
    dispatch.Backend("triton", "gpu", _triton),
    dispatch.Backend("pallas_triton", "gpu", _pallas_triton),
    dispatch.Backend("pallas_tpu", "tpu", _pallas_tpu),
)
