"""Issue 21: the Mosaic GPU linear forward, current kernel against the reverted
three-warpgroup one (`runs/2026-12-07b-linear-forward-three-warpgroups-rebased.patch`)
and jax-linear-attention, side by side in one process, then one profiled forward of each
at 1k, summarised by kernel.

Run by `experiments/gpu_session.sh OUT forward_ab`, which puts the two kernels on the
path as `pm_current` and `pm_three`:

    python3 docs/perf/runs/scripts/2026-12-07b-forward_ab_profile.py OUT
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pm_current
import pm_three
from jla.ops.mosaic_gpu.scalar_gate import simple_gla

from experiments import benchmarking as bm

OUT = sys.argv[1]
ROWS = [("fixed", 1024, 64, 16, 128), ("scalar", 1024, 64, 16, 128),
        ("fixed", 4096, 16, 16, 128), ("fixed", 16384, 4, 16, 128),
        ("fixed", 65536, 1, 16, 128), ("scalar", 8192, 8, 32, 64)]


def ours(module):
  def forward(q, k, v, g):
    b, t, h, d = v.shape
    h0 = jnp.zeros((b, h, q.shape[-1], d), jnp.float32)
    return module.linear_attention(q, k, v, g, h0, jnp.zeros((b, t), bool),
                                   scale=q.shape[-1] ** -0.5, chunk_size=64)[0]
  return forward


def jla(q, k, v, g):
  if g.ndim == 1:
    g = jnp.broadcast_to(g, q.shape[:2] + g.shape)
  return simple_gla(q, k, v, g)[0]


FUNCTIONS = {"current": jax.jit(ours(pm_current)), "three": jax.jit(ours(pm_three)),
             "jla": jax.jit(jla)}
print("| form | seq | batch | heads x dim | current ms | three ms | jla ms | three/current "
      "| err three vs current |\n|---|---|---|---|---|---|---|---|---|", flush=True)
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
  ratio = (f"{times['three'] / times['current']:.3f}"
           if {"three", "current"} <= set(times) else "")
  err = (f"{bm.max_rel_err(outs['three'].astype(jnp.float32), outs['current'].astype(jnp.float32)):.2e}"
         if {"three", "current"} <= set(outs) else "")
  print(f"| {form} | {seq} | {batch} | {heads}x{dim} | {ms.get('current', '')} | "
        f"{ms.get('three', '')} | {ms.get('jla', '')} | {ratio} | {err} |", flush=True)

args = bm.linear_attention_inputs(jax.random.PRNGKey(0), "fixed", 64, 1024, 16, 128, 128,
                                  jnp.bfloat16)
for name, fn in FUNCTIONS.items():
  directory = os.path.join(OUT, f"trace_{name}")
  jax.block_until_ready(fn(*args))
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    for _ in range(5):
      out = fn(*args)
    jax.block_until_ready(out)
  print(f"\n## {name}: 5 forwards at 1k (fixed decay, batch 64, 16 heads of 128)", flush=True)
  subprocess.run([sys.executable, "-m", "experiments.trace_summary", directory], check=False)
