"""Benchmark of `ops.linear_attention` implementations, with softmax flash attention beside.

  python -m experiments.bench_linear_attention --output_dir=/tmp/bench_linear_attention

Default sweep (issue 4): bf16, 16 heads, key and value dim 128, 65,536 tokens per batch
(batch = 65536 / seq), seq 1k, 4k, 16k, 64k; fixed decay, scalar gate, vector gate; forward
and forward+backward. Rows: each `--implementations` entry and, with the same shapes,
causal softmax attention (`--softmax_implementation`, cuDNN by default) to show where
linear attention overtakes it. Each row: median device time, tokens/s, ratio to the XLA
chunked row, and the max relative error against a float32 XLA reference on the first
batch row and first two heads (outputs; for forward+backward, the gradients of q, k, v and
log_decay).
`--peers=jax_linear_attention` also times other libraries' kernels on the same inputs in
the same process (`experiments/peers.py`; `pip install -e '.[bench]'`), as rows
`peer:NAME` (forward+backward: gradients of q, k, v and the log decay too), and gives our
linear rows `vs_best_peer` = the fastest peer's time / ours (above 1, ours is faster). A
peer that is not installed or refuses a row is skipped with a note.
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

_SEQ = flags.DEFINE_list("seq_lens", ["1024", "4096", "16384", "65536"], "Sequence lengths.")
_TOKENS = flags.DEFINE_integer("tokens_per_batch", 65536, "batch = tokens_per_batch // seq.")
_HEADS = flags.DEFINE_integer("heads", 16, "Heads (query/key and value).")
_KEY_DIM = flags.DEFINE_integer("key_dim", 128, "Key dimension.")
_VALUE_DIM = flags.DEFINE_integer("value_dim", 128, "Value dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Input dtype.")
_FORMS = flags.DEFINE_list("forms", ["fixed", "scalar", "vector"], "Decay forms.")
_PASSES = flags.DEFINE_list("passes", ["fwd", "fwd_bwd"], "fwd and/or fwd_bwd.")
_IMPLS = flags.DEFINE_list("implementations", ["pallas_mosaic_gpu", "pallas_triton", "xla"],
                            "Linear attention impls (auto: the op's automatic choice; a row "
                            "that cannot run records why).")
_PEERS = flags.DEFINE_list("peers", [], f"Peers to time beside ours: {', '.join(peers.LINEAR)}.")
_SOFTMAX = flags.DEFINE_string("softmax_implementation", "cudnn",
                               "Softmax attention row (empty: none).")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "chunk_size passed to the op.")
_OUT = flags.DEFINE_string("output_dir", "/tmp/bench_linear_attention", "Output folder.")
_TRIALS = flags.DEFINE_integer("trials", 10, "Timed trials per row (median reported).")
_GUARD = flags.DEFINE_bool(
    "nonfinite_guard", False, "Time our kernels with the ops' non-finite check (True, what "
    "ops calls do by default: it costs forward-only calls a read of k and v, "
    "docs/reliability.md) or alone (False, as the peers run).")

# What a CPU runs when these flags are not set (`benchmarking.small_sweep_on_cpu`).
_CPU_SWEEP = {"seq_lens": "256,512", "tokens_per_batch": "1024", "heads": "4",
              "key_dim": "64", "value_dim": "64"}


def _runner(impl, pass_, chunk_size):
  """Ours (`ops.linear_attention`), `softmax:IMPL` (`ops.dot_product_attention`, causal) or,
  for `peer:NAME`, the peer's."""
  if impl.startswith("softmax:"):
    attn = functools.partial(ops.dot_product_attention, is_causal=True,
                             implementation=impl.split(":", 1)[1])
    fn = lambda q, k, v, g: attn(q, k, v)
  elif impl.startswith("peer:"):
    fn = peers.linear_attention(impl.removeprefix("peer:"))
  else:
    fn = lambda q, k, v, g: ops.linear_attention(q, k, v, log_decay=g,
                                                 implementation=benchmarking.implementation(impl),
                                                 chunk_size=chunk_size)
  argnums = (0, 1, 2) if impl.startswith("softmax:") else (0, 1, 2, 3)
  return benchmarking.jit_pass(fn, pass_, argnums)


def bench_row(impl, seq, form, pass_, key):
  """One row of the table, or None when a peer refuses it (with a note)."""
  heads, key_dim, value_dim = _HEADS.value, _KEY_DIM.value, _VALUE_DIM.value
  batch = max(1, _TOKENS.value // seq)
  dtype = jnp.dtype(_DTYPE.value)
  key, kd = jax.random.split(key)
  q, k, v, g = benchmarking.linear_attention_inputs(key, form, batch, seq, heads, key_dim,
                                                    value_dim, dtype)
  do = jax.random.normal(kd, (batch, seq, heads, value_dim), jnp.float32)
  row = dict(impl=impl, form="-" if impl.startswith("softmax:") else form, seq=seq,
             batch=batch, pass_=pass_)
  fn = _runner(impl, pass_, _CHUNK.value)
  args = (q, k, v, g) if pass_ == "fwd" else (q, k, v, g, do)
  if peers.refuses(impl, fn, args, f"{form} seq {seq} {pass_}"):
    return None
  try:
    seconds = benchmarking.device_time(fn, *args, trials=_TRIALS.value)
  except Exception as e:  # cannot serve, or out of memory
    row["error"] = benchmarking.describe_error(e)
    return row
  row.update(ms=seconds * 1e3, mtok_s=batch * seq / seconds / 1e6)
  if impl.startswith("softmax:"):
    return row
  sl = lambda x: x[:1, :, :2] if x.ndim >= 3 else x[:2]
  small = tuple(sl(x) for x in args)
  ref = _runner("xla", pass_, _CHUNK.value)(
      *(x.astype(jnp.float32) for x in small))
  got = fn(*small)
  got, ref = (x if isinstance(x, tuple) else (x,) for x in (got, ref))
  row["max_rel_err"] = max(benchmarking.max_rel_err(a, b) for a, b in zip(got, ref))
  return row


def main(argv):
  del argv
  with ops.nonfinite_guard(_GUARD.value):
    _sweep()


def _sweep():
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  benchmarking.small_sweep_on_cpu(_CPU_SWEEP)
  impls = (list(_IMPLS.value) + peers.usable(_PEERS.value, "linear")
           + ([f"softmax:{_SOFTMAX.value}"] if _SOFTMAX.value else []))
  columns = ["impl", "form", "seq", "batch", "pass_", "ms", "mtok_s", "x_xla", "vs_best_peer",
             "max_rel_err", "error"]
  header = (f"linear attention, {_DTYPE.value}, heads {_HEADS.value}, key/value dim "
            f"{_KEY_DIM.value}/{_VALUE_DIM.value}, {_TOKENS.value} tokens/batch, chunk "
            f"{_CHUNK.value}, {jax.devices()[0].device_kind}")
  rows, key = [], jax.random.key(0)
  for seq in map(int, _SEQ.value):
    for pass_ in _PASSES.value:
      for form in _FORMS.value:
        group = [r for i in impls
                 if not (i.startswith("softmax:") and form != _FORMS.value[0])
                 and (r := bench_row(i, seq, form, pass_, key))]
        xla_ms = next((r.get("ms") for r in group if r["impl"] == "xla"), None)
        peers.set_vs_best_peer([r for r in group if not r["impl"].startswith("softmax:")])
        for r in group:
          if r.get("ms") and xla_ms:
            r["x_xla"] = xla_ms / r["ms"]
          benchmarking.record(rows, r, _OUT.value, "bench_linear_attention", columns, header)
  print(benchmarking.markdown_table(rows, columns))  # the files: written by record
  benchmarking.plot(_OUT.value, "bench_linear_attention", [r for r in rows if "mtok_s" in r],
                    x="seq", y="mtok_s", series=["impl", "form"], panels=["pass_"])


def run():
  """The `attn-jax-bench-linear-attention` console script."""
  cli.run(main, __name__)


if __name__ == "__main__":
  run()
