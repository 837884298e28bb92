"""Issue 20: where does the Triton-language fixed-gate backward lose to Pallas-Triton's?
Times each launch of both backends alone (H100, fixed gate, B 64, T 1k, H 16, K = V = 128,
bf16, chunk 64), then the Triton gradient kernel over its launch settings.

    python3 docs/perf/runs/scripts/2026-12-07e-triton_backward_profile.py
"""
import dataclasses, itertools, jax, jax.numpy as jnp
from experiments import benchmarking as bm
from pallas_kernels.linear_attention import chunked_plan, pallas_triton as pt, triton as lt

B, T, H, D, C = 64, 1024, 16, 128, 64
ks = jax.random.split(jax.random.PRNGKey(3), 8)
q, k, v, do = (jax.random.normal(ks[i], (B, T, H, D), jnp.bfloat16) for i in range(4))
b = jnp.cumsum(-0.01 * jnp.ones((B, T // C, C, H)), axis=2).reshape(B, T, H)
rel = jnp.zeros((B, T), jnp.int32)
resets = jnp.zeros((B, T), bool)
plan = chunked_plan.make_plan(B, T, H, D, D, jnp.bfloat16, False, D ** -0.5, C, None, False)
print("plan:", plan, flush=True)
states = jax.random.normal(ks[5], (B, H, T // C, D, D), jnp.bfloat16)
d_states = jax.random.normal(ks[6], (B, H, T // C, D, D), jnp.bfloat16)
starts = jnp.zeros((B, H, plan.pieces, D, D), jnp.float32)
d_b = jax.random.normal(ks[7], (B, T, H), jnp.float32)
through = jnp.ones((B, H, T // C, D), jnp.float32)


def ms(fn, *args):
  try:
    return f"{bm.device_time(jax.jit(fn), *args, warmup=2, trials=9) * 1e3:7.3f}"
  except Exception as e:  # a launch that fails to compile is a row, not the end
    return f"{type(e).__name__}: {str(e)[:120]}"


print("| launch | pallas_triton ms | triton ms |")
for name, fn, args in (
    ("output", lambda L, *a: L.output(*a, plan), (q, k, v, b, rel, starts)),
    ("state fwd (write)", lambda L, *a: L.state(*a, plan, reverse=False, write_states=True), (k, v, b, rel, starts)),
    ("state rev (write)", lambda L, *a: L.state(*a, plan, reverse=True, write_states=True), (q, do, b, rel, starts)),
    ("gradients", lambda L, *a: L.gradients(*a, plan), (q, k, v, do, b, rel, states, d_states)),
    ("decay_gradient", lambda L, *a: L.decay_gradient(*a, plan), (b, rel, resets, d_b, d_b, through)),
):
  print(f"| {name} | {ms(lambda *a: fn(pt.LAUNCHES, *a), *args)} | {ms(lambda *a: fn(lt.LAUNCHES, *a), *args)} |", flush=True)

g = jax.random.normal(ks[4], (B, T, H), jnp.float32) * 0.01 - 0.02
h0 = jnp.zeros((B, H, D, D)); r = jnp.zeros((B, T), bool)
for name, mod in (("pallas_triton", pt), ("triton", lt)):
  f = lambda q, k, v, g, mod=mod: mod.linear_attention(q, k, v, g, h0, r, scale=D ** -0.5, chunk_size=C)[0]
  loss = lambda q, k, v, g, f=f: jnp.sum(f(q, k, v, g).astype(jnp.float32) * do.astype(jnp.float32))
  print(f"{name}: fwd {ms(f, q, k, v, g)} ms, fwd+bwd {ms(jax.grad(loss, argnums=(0, 1, 2, 3)), q, k, v, g)} ms", flush=True)

# gradient_block_v: triton loops over value blocks of it in one program; pallas_triton
# launches a program per block and sums dq, dk over them.
print("| gradient_block_v | warps | stages | triton gradients ms | pallas_triton gradients ms |")
grad_args = (q, k, v, do, b, rel, states, d_states)
for bv, warps, stages in itertools.product((32, 64, 128), (4, 8), (1, 2, 3)):
  p = dataclasses.replace(plan, gradient_block_v=bv, gradient_num_warps=warps, num_stages=stages)
  print(f"| {bv} | {warps} | {stages} | {ms(lambda *a: lt.LAUNCHES.gradients(*a, p), *grad_args)} | "
        f"{ms(lambda *a: pt.LAUNCHES.gradients(*a, p), *grad_args)} |", flush=True)
