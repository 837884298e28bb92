"""GPU check + timing: all-Mosaic linear attention (forward, state passes, gradient kernel)
vs Triton vs jax-linear-attention, one process, same inputs. Time-boxed: BUDGET seconds."""
import os, sys, time
import jax, jax.numpy as jnp
from attn_jax import ops
from experiments import benchmarking as bm  # ran as scratch/, with 0c9a924's copy of it
from pallas_kernels.linear_attention import pallas_triton as pt, pallas_mosaic_gpu as pm
from pallas_kernels.linear_attention import pallas_mosaic_gpu_gradients as pmg
from pallas_kernels.linear_attention import pallas_mosaic_gpu_states as pms

T0 = time.time()
BUDGET = float(os.environ.get("BUDGET", "250"))
left = lambda: BUDGET - (time.time() - T0)
try:
  from jla.ops.mosaic_gpu.scalar_gate import simple_gla
except Exception as e:  # noqa
  print("jla missing", e); simple_gla = None

ROWS = [  # (form, seq, batch, heads, dim, impls)
    ("fixed", 1024, 64, 16, 128, ("pallas_mosaic_gpu", "jla", "pallas_triton")),
    ("fixed", 65536, 1, 16, 128, ("pallas_mosaic_gpu", "jla", "pallas_triton")),
    ("scalar", 1024, 64, 16, 128, ("pallas_mosaic_gpu", "jla")),
    ("fixed", 4096, 16, 16, 128, ("pallas_mosaic_gpu", "jla")),
    ("fixed", 16384, 4, 16, 128, ("pallas_mosaic_gpu", "jla")),
    ("scalar", 8192, 8, 32, 64, ("pallas_mosaic_gpu", "jla")),
    ("fixed", 12345, 2, 16, 128, ("pallas_mosaic_gpu", "jla")),
]

def fn_for(impl, heads):
  if impl == "jla":
    def f(q, k, v, g):
      if g.ndim == 1:
        g = jnp.broadcast_to(g, q.shape[:2] + (heads,))
      return simple_gla(q, k, v, g)[0]
    return f
  return lambda q, k, v, g: ops.linear_attention(q, k, v, log_decay=g, implementation=impl)

def runner(f, pass_):
  if pass_ == "fwd":
    return jax.jit(f)
  def loss(q, k, v, g, do):
    return jnp.sum(f(q, k, v, g).astype(jnp.float32) * do)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))

def err(a, b):
  a = a if isinstance(a, tuple) else (a,)
  b = b if isinstance(b, tuple) else (b,)
  return max(bm.max_rel_err(x.astype(jnp.float32), y.astype(jnp.float32)) for x, y in zip(a, b))

for form, seq, batch, heads, dim, impls in ROWS:
  if left() < 20:
    print("budget: stopping the table"); break
  q, k, v, g = bm.linear_attention_inputs(jax.random.PRNGKey(seq + heads), form, batch, seq, heads, dim, dim, jnp.bfloat16)
  do = jax.random.normal(jax.random.PRNGKey(1), v.shape, jnp.float32)
  for pass_ in ("fwd", "fwd_bwd"):
    times, outs = {}, {}
    for impl in impls:
      if impl == "jla" and simple_gla is None:
        continue
      args = (q, k, v, g) if pass_ == "fwd" else (q, k, v, g, do)
      try:
        fn = runner(fn_for(impl, heads), pass_)
        outs[impl] = jax.block_until_ready(fn(*args))
        times[impl] = bm.device_time(fn, *args, warmup=2, trials=7)
      except Exception as e:  # noqa
        print(f"{impl} {form} {seq} {pass_}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
    ref = outs.get("pallas_triton", outs.get("jla"))
    for impl, t in times.items():
      e = err(outs[impl], ref) if ref is not None and impl != ("pallas_triton" if "pallas_triton" in outs else "jla") else None
      vs = times["jla"] / t if "jla" in times else None
      print(f"{form:6} {seq:6} b{batch:<3} h{heads} d{dim} {pass_:7} {impl:18} {t*1e3:8.3f} ms {batch*seq/t/1e6:7.1f} Mtok/s  vs_jla={vs and round(vs, 3)} err={e and round(e, 5)}", flush=True)
    outs = None

# The kernels alone at seq 1k, batch 64, 16 heads, 128: Triton vs Mosaic.
if left() > 40:
  batch, seq, heads, dim = 64, 1024, 16, 128
  plan = pt._make_plan(batch, seq, heads, dim, dim, jnp.bfloat16, False, dim ** -0.5, 64, None, False)
  ks = jax.random.split(jax.random.PRNGKey(3), 8)
  q, k, v, do = (jax.random.normal(ks[i], (batch, seq, heads, dim), jnp.bfloat16) for i in range(4))
  b = jnp.cumsum(-0.01 * jnp.ones((batch, seq // 64, 64, heads)), axis=2).reshape(batch, seq, heads)
  rel = jnp.zeros((batch, seq), jnp.int32)
  states = jax.random.normal(ks[5], (batch, heads, seq // 64, dim, dim), jnp.bfloat16)
  dstates = jax.random.normal(ks[6], (batch, heads, seq // 64, dim, dim), jnp.bfloat16)
  tri = jax.jit(lambda *a: pt._gradient_call(*a, plan))
  mos = jax.jit(lambda *a: pmg.gradients(*a, plan))
  args = (q, k, v, do, b, rel, states, dstates)
  a, m = tri(*args), mos(*args)
  print("gradient kernel errs mosaic vs triton:", [round(bm.max_rel_err(y.astype(jnp.float32), x.astype(jnp.float32)), 5) for x, y in zip(a, m)])
  nbytes = 4 * q.size * 2 + 2 * states.size * 2 + 3 * q.size * 2
  print(f"gradient kernel alone: triton {bm.device_time(tri, *args)*1e3:.3f} ms, mosaic {bm.device_time(mos, *args)*1e3:.3f} ms; floor {nbytes/3.0e12*1e3:.3f} ms ({nbytes/1e9:.2f} GB)", flush=True)
  start = jnp.zeros((batch, heads, 1, dim, dim), jnp.float32)
  for reverse in (False, True):
    tri = jax.jit(lambda x, y, b, rel, s: pt._state_call(x, y, b, rel, s, plan, reverse=reverse, write_states=True))
    mos = jax.jit(lambda x, y, b, rel, s: pms.state_call(x, y, b, rel, s, plan, reverse=reverse, write_states=True))
    a, m = tri(q, v, b, rel, start), mos(q, v, b, rel, start)
    errs = [round(bm.max_rel_err(y.astype(jnp.float32), x.astype(jnp.float32)), 5) for x, y in zip(a, m)]
    print(f"state pass reverse={reverse}: errs {errs}; triton {bm.device_time(tri, q, v, b, rel, start)*1e3:.3f} ms, mosaic {bm.device_time(mos, q, v, b, rel, start)*1e3:.3f} ms; floor {(2*q.size*2 + states.size*2)/3.0e12*1e3:.3f} ms", flush=True)

# Value blocks at 16k and 64k (fixed decay).
for seq, batch in ((16384, 4), (65536, 1)):
  q, k, v, g = bm.linear_attention_inputs(jax.random.PRNGKey(7), "fixed", batch, seq, 16, 128, 128, jnp.bfloat16)
  do = jax.random.normal(jax.random.PRNGKey(1), v.shape, jnp.float32)
  h0 = jnp.zeros((batch, 16, 128, 128), jnp.float32)
  resets = jnp.zeros((batch, seq), bool)
  for vb in (1,):
    if left() < 20:
      break
    blocks = pm.BlockSizes(value_blocks=vb)
    f = lambda q, k, v, g, blocks=blocks: pm.linear_attention(q, k, v, g, h0, resets, scale=128 ** -0.5, chunk_size=64, block_sizes=blocks)[0]
    for pass_ in ("fwd", "fwd_bwd"):
      fn = runner(f, pass_)
      args = (q, k, v, g) if pass_ == "fwd" else (q, k, v, g, do)
      try:
        t = bm.device_time(fn, *args, warmup=2, trials=7)
      except Exception as e:  # noqa
        print("sweep FAILED", seq, vb, pass_, str(e)[:300]); continue
      print(f"value_blocks={vb} seq {seq} b{batch} {pass_:7} {t*1e3:8.3f} ms {batch*seq/t/1e6:7.1f} Mtok/s", flush=True)
print(f"total {time.time() - T0:.0f} s")
