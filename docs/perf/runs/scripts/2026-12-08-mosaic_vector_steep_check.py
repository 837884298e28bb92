"""Compiled check of the Mosaic GPU vector gate on both of its paths (issue 21): mild gates
(factored kernels) and gates too steep to factor (the `triton` fallback), forward and
gradients against XLA in f32 at full precision; prints relative errors.

    python3 docs/perf/runs/scripts/2026-12-08-mosaic_vector_steep_check.py
"""
import jax, jax.numpy as jnp, numpy as np
from attn_jax import ops

B, T, H, K = 2, 300, 4, 64
r = np.random.default_rng(0)
q, k, v = (jnp.asarray(r.standard_normal((B, T, H, K)), jnp.bfloat16) for _ in range(3))
ct = jnp.asarray(r.standard_normal((B, T, H, K)), jnp.float32)
rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) /
                         jnp.linalg.norm(b.astype(jnp.float32)))
for max_decay in (0.3, 3.0):  # chunks fall ≈ 10 / ≈ 96 nats: factored / fallback
  g = jnp.asarray(r.uniform(-max_decay, 0, (B, T, H, K)), jnp.float32)

  def loss(q, k, v, g, impl):
    out = ops.linear_attention(q, k, v, log_decay=g, implementation=impl)[0]
    return jnp.sum(out.astype(jnp.float32) * ct), out

  results = {}
  for impl in ("pallas_mosaic_gpu", "xla"):
    with jax.default_matmul_precision("highest"):
      f = jax.jit(jax.value_and_grad(lambda *a: loss(*a, impl), argnums=(0, 1, 2, 3),
                                     has_aux=True))
      args = (q, k, v, g) if impl != "xla" else tuple(x.astype(jnp.float32) for x in (q, k, v)) + (g,)
      (_, out), grads = f(*args)
    results[impl] = (out, grads)
  (o1, g1), (o2, g2) = results["pallas_mosaic_gpu"], results["xla"]
  errs = [rel(o1, o2)] + [rel(a, b) for a, b in zip(g1, g2)]
  print(f"max_decay {max_decay}: out, dq, dk, dv, dg rel err", " ".join(f"{e:.2e}" for e in errs),
        "finite", all(bool(jnp.all(jnp.isfinite(x))) for x in (o1, *g1)), flush=True)
