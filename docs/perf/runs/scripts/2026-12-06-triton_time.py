import time, jax, jax.numpy as jnp
from experiments import benchmarking as bm  # ran as scratch/, with 0c9a924's copy of it
from pallas_kernels.linear_attention import pallas_triton as pt, triton as lt, pallas_mosaic_gpu_gradients as pmg, pallas_mosaic_gpu_states as pms
for form, seq, batch in (("fixed", 1024, 64), ("scalar", 65536, 1)):
  q, k, v, g = bm.linear_attention_inputs(jax.random.PRNGKey(0), form, batch, seq, 16, 128, 128, jnp.bfloat16)
  do = jax.random.normal(jax.random.PRNGKey(1), v.shape, jnp.float32)
  h0 = jnp.zeros((batch, 16, 128, 128)); r = jnp.zeros((batch, seq), bool)
  for name, mod in (("pallas_triton", pt), ("triton", lt)):
    f = lambda q, k, v, g, mod=mod: mod.linear_attention(q, k, v, g, h0, r, scale=128 ** -0.5, chunk_size=64)[0]
    loss = lambda q, k, v, g, do, f=f: jnp.sum(f(q, k, v, g).astype(jnp.float32) * do)
    for pass_, fn, args in (("fwd", jax.jit(f), (q, k, v, g)), ("fwd_bwd", jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), (q, k, v, g, do))):
      try:
        t = bm.device_time(fn, *args, warmup=2, trials=7)
        print(f"{form} {seq} {name:14} {pass_:7} {t*1e3:7.3f} ms {batch*seq/t/1e6:6.1f} Mtok/s", flush=True)
      except Exception as e:
        print(name, pass_, "FAILED", str(e)[:300], flush=True)
batch, seq, heads, dim = 64, 1024, 16, 128
plan = pt._make_plan(batch, seq, heads, dim, dim, jnp.bfloat16, False, dim ** -0.5, 64, None, False)
ks = jax.random.split(jax.random.PRNGKey(3), 8)
q, k, v, do = (jax.random.normal(ks[i], (batch, seq, heads, dim), jnp.bfloat16) for i in range(4))
b = jnp.cumsum(-0.01 * jnp.ones((batch, seq // 64, 64, heads)), axis=2).reshape(batch, seq, heads)
rel = jnp.zeros((batch, seq), jnp.int32)
st = jax.random.normal(ks[5], (batch, heads, seq // 64, dim, dim), jnp.bfloat16)
dst = jax.random.normal(ks[6], (batch, heads, seq // 64, dim, dim), jnp.bfloat16)
args = (q, k, v, do, b, rel, st, dst)
tri, mos = jax.jit(lambda *a: pt._gradient_call(*a, plan)), jax.jit(lambda *a: pmg.gradients(*a, plan))
print(f"gradient kernel alone (1k): triton {bm.device_time(tri, *args)*1e3:.3f} ms, mosaic {bm.device_time(mos, *args)*1e3:.3f} ms", flush=True)
s0 = jnp.zeros((batch, heads, 1, dim, dim))
for rev in (False, True):
  tri = jax.jit(lambda *a: pt._state_call(*a, plan, reverse=rev, write_states=True))
  mos = jax.jit(lambda *a: pms.state_call(*a, plan, reverse=rev, write_states=True))
  print(f"state pass reverse={rev} (1k): triton {bm.device_time(tri, q, v, b, rel, s0)*1e3:.3f} ms, mosaic {bm.device_time(mos, q, v, b, rel, s0)*1e3:.3f} ms", flush=True)
