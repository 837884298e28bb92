"""Other libraries' attention kernels ("peers"), timed beside ours by the benchmark binaries.

Each peer is an adapter from our call to the peer's own function, on our layout (`[batch,
seq, heads, dim]`) and computing the same function as ours: softmax scale head_dim^-1/2,
`local_window_size=(left, right)` keys around each query; linear attention
`S_t = exp(g_t) S_{t-1} + k_t v_tᵀ`, `o_t = key_dim^-1/2 · S_tᵀ q_t` with natural-log decays.
The binaries check every peer row against the same float32 XLA reference as ours, so a
convention that differs shows as a large `max_rel_err`.

| peer | op | call |
| --- | --- | --- |
| `cudnn` | softmax | `jax.nn.dot_product_attention(..., implementation="cudnn")` (in JAX) |
| `flash_attn3_jax` | softmax | `flash_attn3_jax.flash_mha` (0.2.3; no head_dim 256) |
| `tokamax` | softmax | `tokamax.dot_product_attention(..., implementation="mosaic")` (0.0.17) |
| `jax_linear_attention` | linear | `simple_gla` (fixed, scalar), `gla` (vector) (0.1.0) |

jax_linear_attention's ops are those of `jla.ops.mosaic_gpu` (`scalar_gate`, `gla`); the
fixed decay `[heads]` reaches `simple_gla` broadcast to its `[batch, seq, heads]`.

Install them with `pip install -e '.[bench]'`, or on our GPU machines from wheels with
`experiments/gpu_peer_setup.sh`. A peer that is not installed, not on an NVIDIA GPU or
computes the other op is skipped with a note (`usable`); one that refuses a call when it
is traced (its own checks: head dims, masks, dtypes) skips that row with a note (`refuses`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from experiments import benchmarking

SOFTMAX = ("cudnn", "flash_attn3_jax", "tokamax")
LINEAR = ("jax_linear_attention",)
# peer: (module to import, what to pip install).
_PACKAGES = {"flash_attn3_jax": ("flash_attn3_jax", "flash-attn3-jax==0.2.3"),
             "tokamax": ("tokamax", "tokamax==0.0.17"),
             "jax_linear_attention": ("jla", "jax-linear-attention==0.1.0")}


def unavailable(name: str, op: str) -> str | None:
  """Why peer `name` cannot time `op` ("softmax" or "linear") in this process, or None."""
  if name not in SOFTMAX + LINEAR:
    return f"unknown peer; expected one of {', '.join(SOFTMAX + LINEAR)}"
  if name not in (SOFTMAX if op == "softmax" else LINEAR):
    return f"computes {'linear' if name in LINEAR else 'softmax'} attention, not {op} attention"
  if name in _PACKAGES:
    module, requirement = _PACKAGES[name]
    try:
      importlib.import_module(module)
    except ImportError as e:
      if e.name == module:
        return f"not installed (pip install {requirement})"
      return f"cannot be imported: {benchmarking.describe_error(e)}"
  if jax.default_backend() != "gpu":
    return f"needs an NVIDIA GPU; this process runs on {jax.default_backend()}"
  return None


def usable(names: Sequence[str], op: str) -> list[str]:
  """The row names (`peer:NAME`) of the peers in `names` that can time `op` here; prints
  one note for each other one."""
  kept = []
  for name in names:
    reason = unavailable(name, op)
    if reason:
      print(f"note: peer {name} skipped: {reason}", flush=True)
    else:
      kept.append(f"peer:{name}")
  return kept


def refuses(impl: str, fn: Callable, args: Sequence, where: str) -> bool:
  """True (after printing a note) if peer row `impl` refuses `fn(*args)` when traced."""
  if not impl.startswith("peer:"):
    return False
  try:
    jax.eval_shape(fn, *args)
  except Exception as e:  # the peers' own checks raise ValueError, NotImplementedError, ...
    print(f"note: {impl} skipped for {where}: {benchmarking.describe_error(e)}", flush=True)
    return True
  return False


def set_vs_best_peer(group: Sequence[dict]) -> None:
  """Sets `vs_best_peer` = the fastest peer row's ms / the row's ms on each of our rows of
  one group (same shapes, mask or form, and pass): above 1, ours is faster."""
  best = min((r["ms"] for r in group if r["impl"].startswith("peer:") and r.get("ms")),
             default=None)
  for r in group:
    if best and r.get("ms") and not r["impl"].startswith("peer:"):
      r["vs_best_peer"] = best / r["ms"]


def softmax_attention(name: str, *, is_causal: bool = False,
                      local_window_size: tuple[int, int] | None = None) -> Callable:
  """Peer `name`'s attention(q, k, v) → `[batch, seq, heads, head_dim]` for our mask
  keywords; q `[batch, seq, heads, head_dim]`, k and v `[batch, seq, kv_heads, head_dim]`."""
  if name == "cudnn":
    return functools.partial(jax.nn.dot_product_attention, is_causal=is_causal,
                             local_window_size=local_window_size, implementation="cudnn")
  if name == "tokamax":
    import tokamax
    return functools.partial(tokamax.dot_product_attention, is_causal=is_causal,
                             local_window_size=local_window_size, implementation="mosaic")
  if name == "flash_attn3_jax":
    from flash_attn3_jax import flash_mha
    window = (-1, -1) if local_window_size is None else tuple(local_window_size)

    def attn(q, k, v):
      if q.shape[-1] == 256:  # the 0.2.3 wheel fails at run time instead
        raise NotImplementedError("flash-attn3-jax 0.2.3 is built without head_dim 256")
      return flash_mha(q, k, v, softmax_scale=q.shape[-1] ** -0.5, is_causal=is_causal,
                       window_size=window)
    return attn
  raise ValueError(f"peer {name!r} is not one of {SOFTMAX}.")


def linear_attention(name: str) -> Callable:
  """Peer `name`'s attention(q, k, v, g) → `[batch, seq, heads, value_dim]`; q, k `[batch,
  seq, heads, key_dim]`, v `[batch, seq, heads, value_dim]`, g the log decay in any of
  `benchmarking.linear_attention_inputs`' forms: `[heads]`, `[batch, seq, heads]` or
  `[batch, seq, heads, key_dim]`."""
  if name != "jax_linear_attention":
    raise ValueError(f"peer {name!r} is not one of {LINEAR}.")
  from jla.ops.mosaic_gpu import gla, scalar_gate

  def attn(q, k, v, g):
    scale = q.shape[-1] ** -0.5
    if g.ndim == 4:
      return gla.gla(q, k, v, g, scale=scale)[0]
    return scalar_gate.simple_gla(q, k, v, jnp.broadcast_to(g, q.shape[:3]), scale=scale)[0]
  return attn
