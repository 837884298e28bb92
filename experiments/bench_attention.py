"""Benchmark of `ops.dot_product_attention` implementations, side by side in one run.

  python -m experiments.bench_attention --output_dir=/tmp/bench_attention

Default sweep (issue 3): bf16, head_dim 128, 16 heads, 16,384 tokens per batch
(batch = 16384 / seq), seq 1k–16k, causal and not, forward and forward+backward, plus causal
sliding window 1024 at 16k (`--extra_rows`: rows MASK@SEQ, each with its own head counts
or head dim if given, e.g. `causal@8192/kv_heads=2`, `causal@4096/head_dim=256`). Each
row: median device time, TFLOP/s (only visible query-key pairs count, so causal is about
half), ratio to cuDNN and to XLA of the same row, and the max relative error against a
float32 XLA reference on the first two heads of the first batch row (outputs, and for
forward+backward the gradients of q, k and v).
`--peers=cudnn,flash_attn3_jax,tokamax` also times other libraries' kernels on the same
inputs in the same process (`experiments/peers.py`; `pip install -e '.[bench]'`), as rows
`peer:NAME`, and gives our rows `vs_best_peer` = the fastest peer's time / ours (above 1,
ours is faster). A peer that is not installed or refuses a row is skipped with a note.
On a CPU backend the size flags left unset default to a small sweep instead; the run
prints one line with its values and the flags of the default sweep.
Writes JSON and a markdown table under `--output_dir` after every row (a run stopped by
a time limit keeps the rows it finished), and a plot at the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import flags

from attn_jax import ops
from experiments import benchmarking, cli, peers

_SEQ = flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192", "16384"], "Sequence lengths.")
_TOKENS = flags.DEFINE_integer("tokens_per_batch", 16384, "batch = tokens_per_batch // seq.")
_HEADS = flags.DEFINE_integer("heads", 16, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", None, "Key/value heads (default: heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Input dtype.")
_MASKS = flags.DEFINE_list("masks", ["full", "causal"],
                           "Masks: full, causal, window:<left> (causal + left window).")
_EXTRA_ROWS = flags.DEFINE_list(
    "extra_rows", ["causal_window:1024@16384"],
    "Extra rows MASK@SEQ[/heads=N][/kv_heads=N][/head_dim=N], e.g. causal_window:1024@16384 "
    "or causal@8192/kv_heads=2 (unnamed: the flags' values).")
_PASSES = flags.DEFINE_list("passes", ["fwd", "fwd_bwd"], "fwd and/or fwd_bwd.")
_IMPLS = flags.DEFINE_list("implementations", ["cudnn", "xla", "pallas_triton"],
                           "Implementations to time (auto: the op's automatic choice).")
_PEERS = flags.DEFINE_list("peers", [], f"Peers to time beside ours: {', '.join(peers.SOFTMAX)}.")
_OUT = flags.DEFINE_string("output_dir", "/tmp/bench_attention", "Where JSON/markdown/plot go.")
_TRIALS = flags.DEFINE_integer("trials", 15, "Timed trials per row (median reported).")
_GUARD = flags.DEFINE_bool(
    "nonfinite_guard", False, "Time our kernels with the ops' non-finite check (True, what "
    "ops calls do by default: it costs forward-only calls a read of k and v, "
    "docs/reliability.md) or alone (False, as the peers run).")

# What a CPU runs when these flags are not set (`benchmarking.small_sweep_on_cpu`).
_CPU_SWEEP = {"seq_lens": "256,512", "tokens_per_batch": "1024", "heads": "4", "head_dim": "64",
              "extra_rows": "causal_window:128@512"}


def _mask_kwargs(mask: str) -> dict:
  if mask == "full":
    return {}
  if mask == "causal":
    return {"is_causal": True}
  if mask.startswith(("window:", "causal_window:")):
    return {"is_causal": True, "local_window_size": (int(mask.split(":")[1]), 0)}
  raise ValueError(f"--masks entry {mask!r} is not full, causal or window:<left>.")


def _visible_pairs(seq: int, kwargs: dict) -> int:
  mask = ops.AttentionMask.create(seq, seq, is_causal=kwargs.get("is_causal", False),
                                  local_window_size=kwargs.get("local_window_size"))
  if not mask.is_causal:
    return seq * seq
  width = seq if mask.left is None else mask.left + 1
  return sum(min(i + 1, width) for i in range(seq))


def _cases() -> list[tuple[int, str, dict]]:
  """(seq, mask, shape) of every row: --seq_lens × --masks, then --extra_rows."""
  base = dict(heads=_HEADS.value, kv_heads=_KV_HEADS.value, head_dim=_HEAD_DIM.value)
  cases = [(int(s), m, base) for s in _SEQ.value for m in _MASKS.value]
  for extra in _EXTRA_ROWS.value:
    spec, *options = extra.split("/")
    mask, seq = spec.split("@")
    shape = dict(base)
    for option in options:
      name, value = option.split("=")
      if name not in shape:
        raise ValueError(f"--extra_rows entry {extra!r}: {name!r} is not one of {list(shape)}.")
      shape[name] = int(value)
    cases.append((int(seq), mask, shape))
  return [(s, m, dict(shape, kv_heads=shape["kv_heads"] or shape["heads"]))
          for s, m, shape in cases]


def _runner(impl: str, kwargs: dict, pass_: str):
  """Ours (`ops.dot_product_attention`) or, for `peer:NAME`, the peer's."""
  if impl.startswith("peer:"):
    attn = peers.softmax_attention(impl.removeprefix("peer:"), **kwargs)
  else:
    attn = functools.partial(ops.dot_product_attention,
                             implementation=benchmarking.implementation(impl), **kwargs)
  return benchmarking.jit_pass(attn, pass_, argnums=(0, 1, 2))


def _reference(q, k, v, do, kwargs, pass_):
  """float32 XLA on the first batch row and the first two query heads (their kv heads)."""
  groups = q.shape[2] // k.shape[2]
  kv_heads = 1 if groups > 1 else min(2, k.shape[2])
  heads = kv_heads * groups
  sl = lambda x, h: x[:1, :, :h].astype(jnp.float32)
  args = (sl(q, heads), sl(k, kv_heads), sl(v, kv_heads), sl(do, heads))
  return _runner("xla", kwargs, pass_)(*args[:3 if pass_ == "fwd" else 4]), heads, kv_heads


def bench_row(impl, seq, mask, shape, pass_, key):
  """One row of the table, or None when a peer refuses it (with a note)."""
  heads, kv_heads, head_dim = shape["heads"], shape["kv_heads"], shape["head_dim"]
  batch = max(1, _TOKENS.value // seq)
  dtype = jnp.dtype(_DTYPE.value)
  kq, kk, kv, kd = jax.random.split(key, 4)
  q = jax.random.normal(kq, (batch, seq, heads, head_dim), dtype)
  k = jax.random.normal(kk, (batch, seq, kv_heads, head_dim), dtype)
  v = jax.random.normal(kv, (batch, seq, kv_heads, head_dim), dtype)
  do = jax.random.normal(kd, (batch, seq, heads, head_dim), jnp.float32)
  kwargs = _mask_kwargs(mask)
  row = dict(impl=impl, seq=seq, batch=batch, mask=mask, **shape, pass_=pass_)
  fn = _runner(impl, kwargs, pass_)
  args = (q, k, v) if pass_ == "fwd" else (q, k, v, do)
  where = f"{mask} seq {seq} heads {heads}:{kv_heads} head_dim {head_dim} {pass_}"
  if peers.refuses(impl, fn, args, where):
    return None
  try:
    seconds = benchmarking.device_time(fn, *args, trials=_TRIALS.value)
  except Exception as e:  # an implementation that cannot serve or runs out of memory
    row["error"] = benchmarking.describe_error(e)
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
  with ops.nonfinite_guard(_GUARD.value):
    _sweep()


def _sweep():
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  benchmarking.small_sweep_on_cpu(_CPU_SWEEP)
  impls = list(_IMPLS.value) + peers.usable(_PEERS.value, "softmax")
  columns = ["impl", "mask", "seq", "batch", "heads", "kv_heads", "head_dim", "pass_", "ms",
             "tflops", "x_cudnn", "x_xla", "vs_best_peer", "max_rel_err", "error"]
  header = (f"attention, {_DTYPE.value}, heads {_HEADS.value}, head_dim {_HEAD_DIM.value}, "
            f"{_TOKENS.value} tokens/batch, {jax.devices()[0].device_kind}")
  rows, key = [], jax.random.key(0)
  for seq, mask, shape in _cases():
    for pass_ in _PASSES.value:
      group = [r for impl in impls if (r := bench_row(impl, seq, mask, shape, pass_, key))]
      base = {r["impl"]: r.get("ms") for r in group}
      peers.set_vs_best_peer(group)
      for r in group:
        for ref in ("cudnn", "xla"):
          if r.get("ms") and base.get(ref):
            r[f"x_{ref}"] = base[ref] / r["ms"]
        benchmarking.record(rows, r, _OUT.value, "bench_attention", columns, header)
  print(benchmarking.markdown_table(rows, columns))  # the files: written by record
  benchmarking.plot(_OUT.value, "bench_attention", [r for r in rows if "tflops" in r],
                    x="seq", y="tflops", series=["impl"],
                    panels=["mask", "kv_heads", "head_dim", "pass_"])


def run():
  """The `attn-jax-bench-attention` console script."""
  cli.run(main, __name__)


if __name__ == "__main__":
  run()
