"""Triton-language vector gate forward on GPU: which ingredient breaks it (issue 17/20).

    python3 docs/perf/runs/scripts/2026-12-07d-triton_vector_diag.py
"""
import jax, jax.numpy as jnp, numpy as np
from attn_jax import ops
from experiments import benchmarking as bm
B, T, H, K = 1, 128, 1, 128
def run(name, dt, gscale=1.0, chunk=64, impl="triton", gshift=0.0):
  q, k, v, g = bm.linear_attention_inputs(jax.random.PRNGKey(0), "vector", B, T, H, K, K, jnp.dtype(dt))
  g = g * gscale + gshift
  f32 = lambda *a: (x.astype(jnp.float32) for x in a)
  with ops.nonfinite_guard(False):
    ref = ops.linear_attention(*f32(q, k, v), log_decay=g, implementation="xla")
    out = ops.linear_attention(q, k, v, log_decay=g, implementation=impl, chunk_size=chunk)
    err = jnp.abs(out.astype(jnp.float32) - ref).max(-1).max(-1)[0] / jnp.abs(ref).max()
  bad = np.nonzero(np.asarray(err) > 0.05)[0]
  print(f"| {name} | {float(err.max()):.2e} | bad rows {len(bad)}: {bad[:12].tolist()} |", flush=True)
run("bf16", "bfloat16")
run("bf16 g=0", "bfloat16", 0.0)
run("bf16 g*20 (exact chunks)", "bfloat16", 20.0)
run("f16", "float16")
run("f32", "float32")
run("bf16 chunk 32", "bfloat16", chunk=32)
run("bf16 chunk 16", "bfloat16", chunk=16)
run("bf16 pallas_triton", "bfloat16", impl="pallas_triton")
