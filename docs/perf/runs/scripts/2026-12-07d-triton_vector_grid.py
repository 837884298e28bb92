"""Where does the Triton-language vector-gate forward go wrong on a GPU? One table.

    python3 docs/perf/runs/scripts/2026-12-07d-triton_vector_grid.py
"""
import jax, jax.numpy as jnp, numpy as np
from attn_jax import ops
from experiments import benchmarking as bm
rows = [(1, 128, 1, 128, "bfloat16"), (1, 1024, 1, 128, "bfloat16"), (1, 1024, 16, 128, "bfloat16"),
        (4, 1024, 16, 128, "bfloat16"), (1, 1024, 1, 64, "bfloat16"), (1, 1024, 1, 16, "bfloat16"),
        (1, 1024, 1, 128, "float32"), (1, 1024, 1, 128, "float16"), (1, 256, 1, 128, "bfloat16"),
        (1, 64, 1, 128, "bfloat16")]
import sys
rows = rows[int(sys.argv[1]):] if len(sys.argv) > 1 else rows
print("| B | T | H | K | dtype | triton fwd | pallas_triton fwd | triton final state | triton dq |")
for B, T, H, K, dt in rows:
  q, k, v, g = bm.linear_attention_inputs(jax.random.PRNGKey(0), "vector", B, T, H, K, K, jnp.dtype(dt))
  errs = []
  with ops.nonfinite_guard(False):
    f32 = lambda *a: (x.astype(jnp.float32) for x in a)
    ref, ref_state = jax.jit(lambda *a: ops.linear_attention(*a, log_decay=g, implementation="xla", return_final_state=True))(*f32(q, k, v))  # jitted: op by op, XLA autotunes each einsum (~35 s a row)
    for impl in ("triton", "pallas_triton"):
      try:
        out, state = ops.linear_attention(q, k, v, log_decay=g, implementation=impl, return_final_state=True)
        e = float(jnp.abs(out.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
        es = float(jnp.abs(state - ref_state).max() / jnp.abs(ref_state).max())
        errs.append(f"{e:.2e}")
        if impl == "triton":
          state_err = f"{es:.2e}"
      except Exception as ex:
        errs.append(type(ex).__name__)
        state_err = "-"
    try:
      loss = lambda impl: lambda q: jnp.sum(ops.linear_attention(q, k, v, log_decay=g, implementation=impl).astype(jnp.float32) * v.astype(jnp.float32))
      dq = jax.grad(loss("triton"))(q).astype(jnp.float32)
      dq_ref = jax.jit(jax.grad(lambda q: jnp.sum(ops.linear_attention(q.astype(jnp.float32), *f32(k, v), log_decay=g, implementation="xla") * v.astype(jnp.float32))))(q.astype(jnp.float32))
      edq = f"{float(jnp.abs(dq - dq_ref).max() / jnp.abs(dq_ref).max()):.2e}"
    except Exception as ex:
      edq = type(ex).__name__
  print(f"| {B} | {T} | {H} | {K} | {dt} | {errs[0]} | {errs[1]} | {state_err} | {edq} |", flush=True)
