"""Issue 21: the Mosaic GPU linear forward before (wq, wk, d built by an XLA pass and
streamed by TMA) and after (derived in the kernel from b and rel), beside
jax-linear-attention, in one process; forward only (the backward is unchanged).

    PYTHONPATH=DIR_WITH_pm_before.py:$PYTHONPATH python3 \
        docs/perf/runs/scripts/2026-12-07c-forward_prepass_ab.py

`pm_before` is the kernel module at the commit before the change; "after" is the tree's.
"""
import jax
import jax.numpy as jnp
import pm_before
from jla.ops.mosaic_gpu.scalar_gate import simple_gla

from experiments import benchmarking as bm
from pallas_kernels.linear_attention import pallas_mosaic_gpu as pm_after

ROWS = [("fixed", 1024, 64, 16, 128), ("scalar", 1024, 64, 16, 128),
        ("fixed", 4096, 16, 16, 128), ("fixed", 16384, 4, 16, 128),
        ("fixed", 65536, 1, 16, 128), ("scalar", 8192, 8, 32, 64),
        ("scalar", 12345, 2, 16, 128)]


def ours(module):
  def forward(q, k, v, g):
    b, t, h, d = v.shape
    h0 = jnp.zeros((b, h, q.shape[-1], d), jnp.float32)
    resets = jnp.zeros((b, t), bool).at[:, t // 3].set(True)  # one reset mid-sequence
    return module.linear_attention(q, k, v, g, h0, resets, scale=q.shape[-1] ** -0.5,
                                   chunk_size=64)[0]
  return forward


def jla(q, k, v, g):
  if g.ndim == 1:
    g = jnp.broadcast_to(g, q.shape[:2] + g.shape)
  return simple_gla(q, k, v, g)[0]


FUNCTIONS = {"before": jax.jit(ours(pm_before)), "after": jax.jit(ours(pm_after)),
             "jla": jax.jit(jla)}
print("| form | seq | batch | heads x dim | before ms | after ms | jla ms | after/before "
      "| after/jla | err after vs before |\n|---|---|---|---|---|---|---|---|---|---|",
      flush=True)
for form, seq, batch, heads, dim in ROWS:
  args = bm.linear_attention_inputs(jax.random.PRNGKey(seq), form, batch, seq, heads, dim,
                                    dim, jnp.bfloat16)
  times, outs = {}, {}
  for name, fn in FUNCTIONS.items():
    try:
      outs[name] = jax.block_until_ready(fn(*args))
      times[name] = bm.device_time(fn, *args, warmup=2, trials=9)
    except Exception as e:  # noqa: BLE001  a failing kernel is a row too
      print(f"{name} {form} {seq}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
  ms = {n: f"{t * 1e3:.3f}" for n, t in times.items()}
  ratio = lambda a, b: f"{times[a] / times[b]:.3f}" if {a, b} <= set(times) else ""
  err = (f"{bm.max_rel_err(outs['after'].astype(jnp.float32), outs['before'].astype(jnp.float32)):.2e}"
         if {"after", "before"} <= set(outs) else "")
  print(f"| {form} | {seq} | {batch} | {heads}x{dim} | {ms.get('before', '')} | "
        f"{ms.get('after', '')} | {ms.get('jla', '')} | {ratio('after', 'before')} | "
        f"{ratio('after', 'jla')} | {err} |", flush=True)
