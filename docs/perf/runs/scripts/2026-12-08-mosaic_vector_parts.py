"""Times the parts of the Mosaic GPU vector-gate forward (issue 21) at B 64, T 1k, H 16,
K = V = 128, bf16: the chunk cumsum (Triton), the factoring check, the XLA operand prep
and the forward kernel alone; prints ms per part (median of 20 after warm-up).

    python3 docs/perf/runs/scripts/2026-12-08-mosaic_vector_parts.py
"""
import time
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels.linear_attention import chunked_plan, pallas_mosaic_gpu as pm, triton
from pallas_kernels.linear_attention import pallas_mosaic_gpu_vector as pv

B, T, H, K = 64, 1024, 16, 128
r = np.random.default_rng(0)
q = jnp.asarray(r.standard_normal((B, T, H, K)), jnp.bfloat16)
g = jnp.asarray(-r.uniform(0, 0.1, (B, T, H, K)), jnp.float32)
rel = jnp.zeros((B, T), jnp.int32)
blocks = triton.default_block_sizes(K, K, jnp.bfloat16, vector=True)
plan = chunked_plan.make_plan(B, T, H, K, K, jnp.bfloat16, True, K ** -0.5, 64, blocks, False)
mblocks = pm.BlockSizes(pieces=plan.pieces, value_blocks=1)
starts = jnp.zeros((B, H, plan.pieces, K, K), jnp.float32)


def timed(name, f, *args):
  f = jax.jit(f)
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(20):
    t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
  print(f"{name:28s} {1e3 * np.median(ts):7.3f} ms", flush=True)


b = jax.jit(lambda g: triton.LAUNCHES.chunk_cumsum(g, plan))(g)
timed("chunk_cumsum (triton)", lambda g: triton.LAUNCHES.chunk_cumsum(g, plan), g)
timed("factored(g)", pv.factored, g)
def prep(q, b):
  return (pv._operands(q, b, lambda b: b), pv._operands(q, b, lambda b: -b),
          pv._operands(q, b, pv._from_chunk_end), pv._chunk_decay(b, rel))
timed("operand prep (XLA)", prep, q, b)
qd, kg, kt, d = jax.jit(prep)(q, b)
timed("forward kernel", lambda qd, kg, v, kt, d: pm.output_call(
    qd, kg, v, None, rel, starts, plan, mblocks, vector_operands=(kt, d)), qd, kg, q, kt, d)
timed("whole forward (op)", lambda q, g: pm.linear_attention(
    q, q, q, g, jnp.zeros((B, H, K, K)), jnp.zeros((B, T), bool), scale=K ** -0.5,
    chunk_size=64), q, g)
