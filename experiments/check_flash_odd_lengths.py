"""Mosaic GPU flash attention at a length that is not a multiple of the blocks, against cuDNN.

  python -m experiments.check_flash_odd_lengths            # on an H100 (issue 21, item 3)

For seq 2048, 3000, 4096 causal and 3000 full (bf16, 16 heads, head_dim 128, batch =
16384 // seq), forward and forward + backward: times `pallas_mosaic_gpu` and `cudnn`
(`benchmarking.device_time`, both in this process), and checks ours against cuDNN (whole
tensors) and against float32 XLA (first batch row, first two heads). At lengths off the
blocks it also times the copies the wrapper used to make (q, k, v padded to 128 rows,
the output sliced back), the cost this change removes. Prints one compact table.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import app, flags

from attn_jax import ops
from experiments import benchmarking

_CASES = flags.DEFINE_list("cases", ["2048:causal", "3000:causal", "4096:causal", "3000:full"],
                           "SEQ:MASK entries, MASK causal or full.")
_PASSES = flags.DEFINE_list("passes", ["fwd", "fwd_bwd"], "fwd and/or fwd_bwd.")
_TOKENS = flags.DEFINE_integer("tokens_per_batch", 16384, "batch = tokens_per_batch // seq.")
_HEADS = flags.DEFINE_integer("heads", 16, "Query and key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_TRIALS = flags.DEFINE_integer("trials", 15, "Timed trials per cell (median).")


def _runner(impl: str, causal: bool, pass_: str):
  attn = functools.partial(ops.dot_product_attention, implementation=impl, is_causal=causal)
  if pass_ == "fwd":
    return jax.jit(attn)

  def loss(q, k, v, do):
    return jnp.sum(attn(q, k, v).astype(jnp.float32) * do)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _as_tuple(x):
  return x if isinstance(x, tuple) else (x,)


def _old_copies(q, k, v, out_padded):
  """The copies the old wrapper made around the kernel: q, k, v padded to the padded
  output's rows, and that output sliced back to q's."""
  seq, rows = q.shape[1], out_padded.shape[1]
  pad = lambda x: jnp.pad(x, ((0, 0), (0, rows - seq), (0, 0), (0, 0)))
  return pad(q), pad(k), pad(v), out_padded[:, :seq]


def main(argv):
  del argv
  heads, dim = _HEADS.value, _HEAD_DIM.value
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; bf16, {heads} heads, "
        f"head_dim {dim}, {_TOKENS.value} tokens per batch (batch = tokens // seq)")
  header = ("| seq | mask | batch | pass | ours ms | cuDNN ms | ours / cuDNN | ours TFLOP/s | "
            "cuDNN TFLOP/s | err vs cuDNN | err vs f32 | old copies ms |")
  rows = [header, "|" + "---|" * (header.count("|") - 1)]
  for case in _CASES.value:
    seq, mask = case.split(":")
    seq, causal = int(seq), {"causal": True, "full": False}[mask]
    batch = max(1, _TOKENS.value // seq)
    kq, kk, kv, kd = jax.random.split(jax.random.key(seq), 4)
    shape = (batch, seq, heads, dim)
    q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in (kq, kk, kv))
    do = jax.random.normal(kd, shape, jnp.float32)
    pairs = seq * (seq + 1) // 2 if causal else seq * seq
    copies_ms = ""
    if seq % 128:
      out_padded = jnp.zeros((batch, -(-seq // 128) * 128, heads, dim), q.dtype)
      seconds = benchmarking.device_time(jax.jit(_old_copies), q, k, v, out_padded,
                                         trials=_TRIALS.value)
      copies_ms = f"{seconds * 1e3:.3f}"
    for pass_ in _PASSES.value:
      args = (q, k, v) if pass_ == "fwd" else (q, k, v, do)
      ms, outs = {}, {}
      for impl in ("pallas_mosaic_gpu", "cudnn"):
        fn = _runner(impl, causal, pass_)
        try:
          ms[impl] = benchmarking.device_time(fn, *args, trials=_TRIALS.value) * 1e3
          outs[impl] = _as_tuple(fn(*args))
        except Exception as e:  # report, go on with the other rows
          print(f"{case} {pass_} {impl}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      ours, cudnn = ms.get("pallas_mosaic_gpu"), ms.get("cudnn")
      err_cudnn = err_f32 = float("nan")
      if "pallas_mosaic_gpu" in outs and "cudnn" in outs:
        err_cudnn = max(benchmarking.max_rel_err(a, b)
                        for a, b in zip(outs["pallas_mosaic_gpu"], outs["cudnn"]))
      if "pallas_mosaic_gpu" in outs:  # float32 XLA on the first batch row, two heads
        sl = lambda x: x[:1, :, :2]
        f32 = [sl(x).astype(jnp.float32) for x in args]
        ref = _as_tuple(_runner("xla", causal, pass_)(*f32))
        got = _as_tuple(_runner("pallas_mosaic_gpu", causal, pass_)(*(sl(x) for x in args)))
        err_f32 = max(benchmarking.max_rel_err(a, b) for a, b in zip(got, ref))
      flops = 4 * batch * heads * dim * pairs * (3.5 if pass_ == "fwd_bwd" else 1.0)
      tf = lambda t: f"{flops / t / 1e9:.0f}" if t else "-"
      f = lambda t: f"{t:.3f}" if t else "-"
      ratio = f"**{cudnn / ours:.2f}**" if ours and cudnn else "-"
      row = (f"| {seq} | {mask} | {batch} | {pass_} | {f(ours)} | {f(cudnn)} | {ratio} | "
             f"{tf(ours)} | {tf(cudnn)} | {err_cudnn:.2g} | {err_f32:.2g} | "
             f"{copies_ms if pass_ == 'fwd' else ''} |")
      print(row, flush=True)
      rows.append(row)
  print("\nours / cuDNN: cuDNN's time over ours (> 1: ours faster). old copies: the pad and "
        "slice copies the previous wrapper made at this length (forward), timed alone.\n")
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
