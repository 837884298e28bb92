"""Benchmark of `ops.dot_product_attention` implementations, side by side in one run.

  python -m experiments.bench_attention --output_dir=/tmp/bench_attention

Default sweep (issue 3): bf16, head_dim 128, 16 heads, 16,384 tokens per batch
(batch = 16384 / seq), seq 1k–16k, causal and not, forward and forward+backward, plus causal
sliding window 1024 at 16k. Each row: median device time, TFLOP/s (only visible query-key
pairs count, so causal is about half), ratio to cuDNN and to XLA of the same row, and the
max relative error against a float32 XLA reference on the first two heads of the first
batch row (outputs, and for forward+backward the gradients of q, k and v).
Writes JSON and a markdown table under `--output_dir` after every row (a run stopped by
a time limit keeps the rows it finished), and a plot at the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import app, flags

from attn_jax import ops
from attn_jax.ops.attention_mask import AttentionMask
from experiments import benchmarking

_SEQ = flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192", "16384"], "Sequence lengths.")
_TOKENS = flags.DEFINE_integer("tokens_per_batch", 16384, "batch = tokens_per_batch // seq.")
_HEADS = flags.DEFINE_integer("heads", 16, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", None, "Key/value heads (default: heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Input dtype.")
_MASKS = flags.DEFINE_list("masks", ["full", "causal"],
                           "Masks: full, causal, window:<left> (causal + left window).")
_WINDOW_ROWS = flags.DEFINE_list("window_rows", ["causal_window:1024@16384"],
                                 "Extra rows MASK@SEQ, e.g. causal_window:1024@16384.")
_PASSES = flags.DEFINE_list("passes", ["fwd", "fwd_bwd"], "fwd and/or fwd_bwd.")
_IMPLS = flags.DEFINE_list("implementations", ["cudnn", "xla", "pallas_triton"],
                           "Implementations to time.")
_OUT = flags.DEFINE_string("output_dir", "/tmp/bench_attention", "Where JSON/markdown/plot go.")
_TRIALS = flags.DEFINE_integer("trials", 15, "Timed trials per row (median reported).")


def _mask_kwargs(mask: str) -> dict:
  if mask == "full":
    return {}
  if mask == "causal":
    return {"is_causal": True}
  if mask.startswith(("window:", "causal_window:")):
    return {"is_causal": True, "local_window_size": (int(mask.split(":")[1]), 0)}
  raise ValueError(f"--masks entry {mask!r} is not full, causal or window:<left>.")


def _visible_pairs(seq: int, kwargs: dict) -> int:
  left = (kwargs.get("local_window_size") or (None, None))[0]
  mask = AttentionMask(seq, seq, kwargs.get("is_causal", False), left, None)
  if not mask.is_causal:
    return seq * seq
  width = seq if left is None else left + 1
  return sum(min(i + 1, width) for i in range(seq))


def _runner(impl: str, kwargs: dict, pass_: str):
  attn = functools.partial(ops.dot_product_attention, implementation=impl, **kwargs)
  if pass_ == "fwd":
    return jax.jit(attn)

  def loss(q, k, v, do):
    return jnp.sum(attn(q, k, v).astype(jnp.float32) * do)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _reference(q, k, v, do, kwargs, pass_):
  """float32 XLA on the first batch row and the first two query heads (their kv heads)."""
  groups = q.shape[2] // k.shape[2]
  kv_heads = 1 if groups > 1 else min(2, k.shape[2])
  heads = kv_heads * groups
  sl = lambda x, h: x[:1, :, :h].astype(jnp.float32)
  args = (sl(q, heads), sl(k, kv_heads), sl(v, kv_heads), sl(do, heads))
  return _runner("xla", kwargs, pass_)(*args[:3 if pass_ == "fwd" else 4]), heads, kv_heads


def bench_row(impl, seq, mask, pass_, key):
  heads, head_dim = _HEADS.value, _HEAD_DIM.value
  kv_heads = _KV_HEADS.value or heads
  batch = max(1, _TOKENS.value // seq)
  dtype = jnp.dtype(_DTYPE.value)
  kq, kk, kv, kd = jax.random.split(key, 4)
  q = jax.random.normal(kq, (batch, seq, heads, head_dim), dtype)
  k = jax.random.normal(kk, (batch, seq, kv_heads, head_dim), dtype)
  v = jax.random.normal(kv, (batch, seq, kv_heads, head_dim), dtype)
  do = jax.random.normal(kd, (batch, seq, heads, head_dim), jnp.float32)
  kwargs = _mask_kwargs(mask)
  row = dict(impl=impl, seq=seq, batch=batch, mask=mask, pass_=pass_)
  fn = _runner(impl, kwargs, pass_)
  args = (q, k, v) if pass_ == "fwd" else (q, k, v, do)
  try:
    seconds = benchmarking.device_time(fn, *args, trials=_TRIALS.value)
  except Exception as e:  # an implementation that cannot serve or runs out of memory
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return row
  flops = 4 * batch * heads * head_dim * _visible_pairs(seq, kwargs)
  flops *= 3.5 if pass_ == "fwd_bwd" else 1.0  # backward = 2.5 forward (5 matmuls vs 2)
  row.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12)
  ref, h, hk = _reference(q, k, v, do, kwargs, pass_)
  sl = lambda x, n: x[:1, :, :n]
  got = fn(*(sl(q, h), sl(k, hk), sl(v, hk)) + (() if pass_ == "fwd" else (sl(do, h),)))
  got, ref = (x if isinstance(x, tuple) else (x,) for x in (got, ref))
  row["max_rel_err"] = max(benchmarking.max_rel_err(g, r) for g, r in zip(got, ref))
  return row


def main(argv):
  del argv
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  cases = [(int(s), m) for s in _SEQ.value for m in _MASKS.value]
  for extra in _WINDOW_ROWS.value:
    mask, seq = extra.split("@")
    cases.append((int(seq), mask))
  columns = ["impl", "mask", "seq", "batch", "pass_", "ms", "tflops", "x_cudnn", "x_xla",
             "max_rel_err", "error"]
  header = (f"attention, {_DTYPE.value}, heads {_HEADS.value}, head_dim {_HEAD_DIM.value}, "
            f"{_TOKENS.value} tokens/batch, {jax.devices()[0].device_kind}")
  rows, key = [], jax.random.key(0)
  for seq, mask in cases:
    for pass_ in _PASSES.value:
      group = [bench_row(impl, seq, mask, pass_, key) for impl in _IMPLS.value]
      base = {r["impl"]: r.get("ms") for r in group}
      for r in group:
        for ref in ("cudnn", "xla"):
          if r.get("ms") and base.get(ref):
            r[f"x_{ref}"] = base[ref] / r["ms"]
        benchmarking.record(rows, r, _OUT.value, "bench_attention", columns, header)
  print(benchmarking.markdown_table(rows, columns))  # the files: written by record
  benchmarking.plot(_OUT.value, "bench_attention", [r for r in rows if "tflops" in r],
                    x="seq", y="tflops", series=["impl"], panels=["mask", "pass_"])


def run():
  app.run(main)


if __name__ == "__main__":
  run()
