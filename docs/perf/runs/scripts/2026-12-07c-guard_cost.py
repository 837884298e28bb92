"""Issue 17: what the ops' non-finite guard (`attn_jax.ops.nonfinite_guard`) costs on a
GPU: each op through its kernel with the guard on (the default) and off, forward and
forward + backward, side by side in one process; then one guarded call on an input with
a NaN (the exact branch), checked against the XLA path's pattern of NaN rows.

    python3 docs/perf/runs/scripts/2026-12-07c-guard_cost.py
"""
import jax
import jax.numpy as jnp
import numpy as np

from attn_jax import ops
from experiments import benchmarking as bm


def softmax(implementation):
  return lambda q, k, v: ops.dot_product_attention(q, k, v, is_causal=True,
                                                   implementation=implementation)


def linear(implementation, g):
  return lambda q, k, v: ops.linear_attention(q, k, v, log_decay=g,
                                              implementation=implementation)


key = jax.random.PRNGKey(0)
rows = []
for seq, batch in ((16384, 1), (2048, 8)):
  q, k, v = (jax.random.normal(kk, (batch, seq, 16, 128), jnp.bfloat16)
             for kk in jax.random.split(key, 3))
  for impl in ("pallas_mosaic_gpu", "cudnn"):
    rows.append((f"softmax causal {seq} x{batch} {impl}", lambda i=impl: softmax(i),
                 (q, k, v)))
for seq, batch in ((1024, 64), (16384, 4)):
  q, k, v, g = bm.linear_attention_inputs(key, "fixed", batch, seq, 16, 128, 128,
                                          jnp.bfloat16)
  rows.append((f"linear fixed {seq} x{batch} pallas_mosaic_gpu",
               lambda g=g: linear("pallas_mosaic_gpu", g), (q, k, v)))

print("| call | pass | guard off ms | guard on ms | on / off | conds off / on |\n"
      "|---|---|---|---|---|---|",
      flush=True)
for name, make, args in rows:  # a new function per guard setting: jit caches by function
  for pass_ in ("fwd", "fwd_bwd"):
    times, conds = {}, {}
    for guard in (False, True):
      fn = make()
      with ops.nonfinite_guard(guard):
        jitted = bm.jit_pass(fn, pass_, (0, 1, 2))
        call_args = args if pass_ == "fwd" else (
            *args, jnp.ones(jax.eval_shape(fn, *args).shape, jnp.float32))
        jax.block_until_ready(jitted(*call_args))
        conds[guard] = str(jax.make_jaxpr(jitted)(*call_args)).count("cond[")
      times[guard] = bm.device_time(jitted, *call_args, warmup=2, trials=9)
    print(f"| {name} | {pass_} | {times[False] * 1e3:.3f} | {times[True] * 1e3:.3f} | "
          f"{times[True] / times[False]:.3f} | {conds[False]} / {conds[True]} |", flush=True)

# The exact branch on the GPU: a NaN value at token 20 of a causal 256-token row.
q, k, v = (jax.random.normal(kk, (1, 256, 4, 64), jnp.bfloat16)
           for kk in jax.random.split(key, 3))
v = v.at[0, 20].set(jnp.nan)
want = ~np.isfinite(np.asarray(softmax("xla")(q, k, v), np.float32)).all(axis=(2, 3))
for impl in ("pallas_mosaic_gpu", "cudnn"):
  got = ~np.isfinite(np.asarray(jax.jit(softmax(impl))(q, k, v), np.float32)).all(axis=(2, 3))
  print(f"exact branch, softmax {impl}: NaN rows as XLA's: {bool((got == want).all())}")
q, k, v, g = bm.linear_attention_inputs(key, "fixed", 1, 256, 4, 64, 64, jnp.bfloat16)
v = v.at[0, 20].set(jnp.nan)
want = ~np.isfinite(np.asarray(linear("xla", g)(q, k, v), np.float32)).all(axis=(2, 3))
got = ~np.isfinite(np.asarray(jax.jit(linear("pallas_mosaic_gpu", g))(q, k, v),
                              np.float32)).all(axis=(2, 3))
print(f"exact branch, linear pallas_mosaic_gpu: NaN rows as XLA's: {bool((got == want).all())}")
