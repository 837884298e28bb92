"""Exact answers from the kernels when an input holds a NaN or an Inf.

A fused kernel masks inside a tile by multiplying by 0, so a non-finite key or value at a
masked position of the same tile reaches outputs that do not see it (0 · NaN is NaN), and
a non-finite query reaches the gradients of keys it does not see. The XLA paths never let
it (docs/reliability.md). Around every kernel the ops check that key and value are finite
(one read of each, reduced to one flag; a bad query reaches only its own row in every
kernel's forward) and `lax.cond` on that flag:

- all finite (every call of a healthy run): the kernel, on the inputs as they are;
- otherwise: the kernel on copies with the non-finite rows zeroed, then NaN put back, as
  the XLA paths do, exactly where the mask lets a bad row be seen. Softmax attention finds
  those queries with a second call of the same kernel on zero queries and keys (every
  visible key then has weight 1/n, so no weight underflows) and the bad-row flags as
  values; linear attention from the runs (segments) alone.

Differentiated, by default the guard steps aside: it is a `custom_vjp` whose forward
rule is the kernel's own, because autodiff through a `lax.cond` carries both branches'
residuals (measured on an H100: forward + backward 5-85 % slower; docs/reliability.md).
Under `jax.grad` a non-finite input therefore reaches what the kernel lets it reach.
`nonfinite_guard(True, gradients=True)` guards gradients too, at the cost of reading key
and value in the forward and query and the cotangents in the backward: the forward rule
keeps the kernel's VJP residuals and returns guarded outputs; the backward runs the
kernel's VJP when everything is finite, else the kernel's VJP on zeroed copies, exact
for a loss that leaves out the outputs that see a bad row, and NaN gradients for one
that does not (its value is NaN). Both branches are compiled; under `vmap` the flag is
batched and `lax.cond` becomes a select that runs both. `nonfinite_guard(False)` turns
the check off within a context (a benchmark of the kernels alone, inputs known to be
finite). Like `dispatch.kernels`, it is read when JAX traces.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.nonfinite import mark_linear, zero_nonfinite

# (guard outputs, guard gradients too)
_MODE = contextvars.ContextVar("attn_jax_nonfinite_guard", default=(True, False))


@contextlib.contextmanager
def nonfinite_guard(enabled: bool, *, gradients: bool = False):
  """Within the context, kernels called by the ops are (True, the default) or are not
  (False) guarded against non-finite inputs reaching outputs that do not see them;
  `gradients=True` guards their gradients too (see the module docstring for the cost)."""
  for name, value in (("enabled", enabled), ("gradients", gradients)):
    if not isinstance(value, bool):
      raise ValueError(f"nonfinite_guard's {name} takes True or False; got {value!r}.")
  if gradients and not enabled:
    raise ValueError("nonfinite_guard(False, gradients=True): guarding gradients needs "
                     "the guard on (enabled=True).")
  token = _MODE.set((enabled, gradients))
  try:
    yield
  finally:
    _MODE.reset(token)


def guard_attention(run):
  """`run(query, key, value, q_segment_ids, kv_segment_ids, sinks, **static)`, a softmax
  attention kernel's op call (`attention._backend`), guarded as the module says."""
  return _guard(run, _exact_attention)


def guard_linear(run):
  """`run(query, key, value, log_decay, initial_state, resets, **static)`, a causal linear
  attention kernel's op call (`linear_attention.BACKENDS`), guarded as the module says."""
  return _guard(run, _exact_linear)


def _guard(run, exact):
  """`run` when disabled or when its operands 1 and 2 (key, value) are finite, else
  `exact(run, operands, static)`; differentiated, `run`'s own VJP, or with gradients
  guarded `_guarded_vjp`'s."""

  def guarded(*operands, **static):
    enabled, gradients = _MODE.get()
    if not enabled:
      return run(*operands, **static)
    unguarded = lambda *ops: run(*ops, **static)
    exact_call = lambda ops: exact(run, ops, static)

    @jax.custom_vjp
    def call(*ops):
      return lax.cond(_all_finite(*ops[1:3]), lambda o: unguarded(*o), exact_call, ops)

    if gradients:
      call.defvjp(*_guarded_vjp(unguarded, exact_call))
    else:
      call.defvjp(lambda *ops: jax.vjp(unguarded, *ops), lambda vjp, g: vjp(g))
    return call(*operands)

  return guarded


def _guarded_vjp(unguarded, exact):
  """The (forward, backward) rules of a call whose gradients are guarded too.

  Forward: the kernel's VJP residuals and the guarded outputs (the kernel's own when key
  and value are finite). Backward: the kernel's VJP when query, key, value and the
  cotangents are finite (one more read of the query and of the cotangents); otherwise the
  kernel's VJP on copies with the non-finite rows zeroed, which is exact when every output
  that sees a bad row has a zero cotangent (a loss that leaves them out), and NaN for
  every gradient when one does not or a cotangent is not finite (the loss is NaN then).
  """

  def fwd(*ops):
    out, vjp = jax.vjp(unguarded, *ops)
    finite = _all_finite(*ops[1:3])
    return lax.cond(finite, lambda: out, lambda: exact(ops)), (vjp, ops, finite)

  def bwd(residuals, cotangents):
    vjp, ops, finite = residuals
    ok = finite & _all_finite(ops[0], *jax.tree.leaves(cotangents))
    return lax.cond(ok, lambda: vjp(cotangents), lambda: _exact_gradients(ops, cotangents))

  def _exact_gradients(ops, cotangents):
    zeroed = tuple(zero_nonfinite(x)[0] if i < 3 else x for i, x in enumerate(ops))
    grads = jax.vjp(unguarded, *zeroed)[1](cotangents)
    seen = [jnp.any((ct != 0) & ~jnp.isfinite(out)) | ~jnp.all(jnp.isfinite(ct))
            for ct, out in zip(jax.tree.leaves(cotangents), jax.tree.leaves(exact(ops)))]
    nan = lambda g: jnp.full_like(g, jnp.nan) if jnp.issubdtype(g.dtype, jnp.inexact) else g
    return lax.cond(jnp.any(jnp.stack(seen)), lambda: jax.tree.map(nan, grads),
                    lambda: grads)

  return fwd, bwd


def _all_finite(*arrays):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in arrays]))


def _exact_attention(run, operands, static):
  query, key, value, q_segment_ids, kv_segment_ids, sinks = operands
  (query, bad_q), (key, bad_k), (value, bad_v) = map(zero_nonfinite, (query, key, value))
  result = run(query, key, value, q_segment_ids, kv_segment_ids, sinks, **static)
  bad_rows = jnp.broadcast_to((bad_k | bad_v)[..., None], value.shape).astype(value.dtype)
  seen = run(jnp.zeros_like(query), jnp.zeros_like(key), bad_rows, q_segment_ids,
             kv_segment_ids, None, **dict(static, logits_soft_cap=None, return_residuals=False))
  sees_bad = bad_q | (seen[..., 0] > 0)  # [batch, q_seq, q_heads]
  if not static["return_residuals"]:
    return jnp.where(sees_bad[..., None], jnp.nan, result)
  out, lse = result
  return (jnp.where(sees_bad[..., None], jnp.nan, out),
          jnp.where(jnp.moveaxis(sees_bad, 1, 2), jnp.nan, lse))


def _exact_linear(run, operands, static):
  query, key, value, log_decay, initial_state, resets = operands
  (query, bad_q), (key, bad_k), (value, bad_v) = map(zero_nonfinite, (query, key, value))
  out, final = run(query, key, value, log_decay, initial_state, resets, **static)
  ratio = value.shape[2] // key.shape[2]  # value heads per key head
  bad_q, bad_k = (jnp.repeat(x, ratio, axis=2) for x in (bad_q, bad_k))
  return mark_linear(out, final, bad_q, bad_k | bad_v, resets)
