"""A/B of the Mosaic GPU linear forward: old (HEAD: shared Q/K, one warpgroup per 64 value
columns, serial chunk chain) vs new (state / output / memory warpgroups) vs jla, one
process, same inputs; then forward + backward new vs jla; slots sweep at 1k."""
import os, time
import jax, jax.numpy as jnp
from experiments import benchmarking as bm
from pallas_kernels.linear_attention import pallas_mosaic_gpu as pm
import scratch.pm_old as old
from jla.ops.mosaic_gpu.scalar_gate import simple_gla

T0 = time.time()
BUDGET = float(os.environ.get("BUDGET", "250"))
left = lambda: BUDGET - (time.time() - T0)
ROWS = [("fixed", 1024, 64, 16, 128), ("scalar", 1024, 64, 16, 128), ("fixed", 4096, 16, 16, 128),
        ("fixed", 16384, 4, 16, 128), ("fixed", 65536, 1, 16, 128), ("scalar", 8192, 8, 32, 64),
        ("fixed", 12345, 2, 16, 128)]

def ours(module, blocks=None):
  def f(q, k, v, g):
    b, t, h, d = v.shape
    h0 = jnp.zeros((b, h, q.shape[-1], d), jnp.float32)
    r = jnp.zeros((b, t), bool)
    return module.linear_attention(q, k, v, g, h0, r, scale=q.shape[-1] ** -0.5, chunk_size=64,
                                   block_sizes=blocks)[0]
  return f

def jla(q, k, v, g):
  if g.ndim == 1:
    g = jnp.broadcast_to(g, q.shape[:2] + g.shape)
  return simple_gla(q, k, v, g)[0]

for form, seq, batch, heads, dim in ROWS:
  if left() < 25:
    print("budget: stop"); break
  q, k, v, g = bm.linear_attention_inputs(jax.random.PRNGKey(seq), form, batch, seq, heads, dim, dim, jnp.bfloat16)
  do = jax.random.normal(jax.random.PRNGKey(1), v.shape, jnp.float32)
  for pass_ in ("fwd", "fwd_bwd"):
    fns = {"new": ours(pm), "jla": jla} | ({"old": ours(old)} if pass_ == "fwd" else {})
    times, outs = {}, {}
    for name, f in fns.items():
      fn = bm.jit_pass(f, pass_, (0, 1, 2, 3))
      args = (q, k, v, g) if pass_ == "fwd" else (q, k, v, g, do)
      try:
        outs[name] = jax.block_until_ready(fn(*args))
        times[name] = bm.device_time(fn, *args, warmup=2, trials=9)
      except Exception as e:  # noqa
        print(f"{name} {form} {seq} {pass_}: FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
    for name, t in times.items():
      a = outs[name] if isinstance(outs[name], tuple) else (outs[name],)
      r = outs.get("jla")
      r = r if isinstance(r, tuple) else (r,)
      e = max(bm.max_rel_err(x.astype(jnp.float32), y.astype(jnp.float32)) for x, y in zip(a, r)) if "jla" in outs else None
      print(f"{form:6} {seq:6} b{batch:<2} h{heads} d{dim} {pass_:7} {name:4} {t*1e3:7.3f} ms {batch*seq/t/1e6:6.1f} Mtok/s "
            f"jla/ours={times.get('jla', float('nan'))/t:.3f} err_vs_jla={e if e is None else round(e, 5)}", flush=True)
if left() > 30:
  q, k, v, g = bm.linear_attention_inputs(jax.random.PRNGKey(0), "fixed", 64, 1024, 16, 128, 128, jnp.bfloat16)
  for slots in (2, 3, 4):
    fn = jax.jit(ours(pm, pm.BlockSizes(slots=slots)))
    print(f"slots={slots} fwd 1k: {bm.device_time(fn, q, k, v, g, warmup=2, trials=9)*1e3:.3f} ms", flush=True)
print(f"total {time.time() - T0:.0f} s")
