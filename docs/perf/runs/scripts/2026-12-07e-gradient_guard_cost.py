"""Issue 17: what guarding gradients (`ops.nonfinite_guard(True, gradients=True)`) costs
on a GPU against the default guard (outputs only), forward + backward, side by side in one
process; then the guarded gradients of a loss that leaves out the NaN rows, against XLA's.

    python3 docs/perf/runs/scripts/2026-12-07e-gradient_guard_cost.py
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
  rows.append((f"softmax causal {seq} x{batch}", lambda: softmax("pallas_mosaic_gpu"), (q, k, v)))
for seq, batch in ((1024, 64), (16384, 4)):
  q, k, v, g = bm.linear_attention_inputs(key, "fixed", batch, seq, 16, 128, 128,
                                          jnp.bfloat16)
  rows.append((f"linear fixed {seq} x{batch}", lambda g=g: linear("pallas_mosaic_gpu", g),
               (q, k, v)))

print("| call (pallas_mosaic_gpu, fwd+bwd) | outputs guarded ms | gradients too ms | ratio |\n"
      "|---|---|---|---|", flush=True)
for name, make, args in rows:  # a new function per setting: jit caches by function
  times = {}
  for gradients in (False, True):
    fn = make()
    with ops.nonfinite_guard(True, gradients=gradients):
      jitted = bm.jit_pass(fn, "fwd_bwd", (0, 1, 2))
      call_args = (*args, jnp.ones(jax.eval_shape(fn, *args).shape, jnp.float32))
      jax.block_until_ready(jitted(*call_args))
    times[gradients] = bm.device_time(jitted, *call_args, warmup=2, trials=9)
  print(f"| {name} | {times[False] * 1e3:.3f} | {times[True] * 1e3:.3f} | "
        f"{times[True] / times[False]:.3f} |", flush=True)

# Guarded gradients on the GPU: a NaN value at token 20 of a causal 256-token row, a loss
# of the rows that do not see it.
q, k, v = (jax.random.normal(kk, (1, 256, 4, 64), jnp.bfloat16)
           for kk in jax.random.split(key, 3))
v = v.at[0, 20].set(jnp.nan)
_, _, _, g = bm.linear_attention_inputs(key, "fixed", 1, 256, 4, 64, 64, jnp.bfloat16)
for name, make in (("softmax", softmax), ("linear", lambda i: linear(i, g))):
  sees = ~np.isfinite(np.asarray(make("xla")(q, k, v), np.float32)).all(axis=-1)
  loss = lambda q, k, v, impl: jnp.sum(jnp.where(jnp.asarray(~sees)[..., None],
                                                 make(impl)(q, k, v), 0.0).astype(jnp.float32) ** 2)
  want = jax.grad(loss, (0, 1, 2))(q, k, v, "xla")
  with ops.nonfinite_guard(True, gradients=True):
    got = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(q, k, v, "pallas_mosaic_gpu")
  err = max(float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()
                  / jnp.abs(b.astype(jnp.float32)).max()) for a, b in zip(got, want))
  print(f"guarded gradients, {name} pallas_mosaic_gpu: finite "
        f"{all(bool(jnp.isfinite(x).all()) for x in got)}, max rel err vs XLA {err:.2e}")
