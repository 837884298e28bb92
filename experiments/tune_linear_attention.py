r"""Sweep the Triton linear-attention kernels' launch settings: `python -m
experiments.tune_linear_attention`.

    # the fused forward's tiles and launch settings (docs/perf/linear_attention.md)
    python -m experiments.tune_linear_attention --passes=fwd --chunk_sizes=64,128 \
        --block_v=64,128 --num_warps=4,8 --num_stages=1,2
    # the gradient kernel's
    python -m experiments.tune_linear_attention --passes=fwd_bwd \
        --gradient_block_v=0,64 --gradient_num_warps=4,8
    # the Triton-language gradient kernel's value-block loop
    python -m experiments.tune_linear_attention --kernels=triton --passes=fwd_bwd \
        --gradient_block_v=32,64 --gradient_num_warps=8 --gradient_num_stages=2,3

Times the Triton kernels of `--kernels` (`pallas_triton`, the Pallas Triton lowering;
`triton`, the Triton-language kernels through jax-triton) for every combination of the
listed settings (a flag left at its default keeps that backend's defaults:
`BlockSizes.get_default`, or `triton.default_block_sizes`, which gives its looped
gradient kernel its own), device-timed medians after warm-up, on the benchmark's shapes
and decay forms (`bench_linear_attention`). Decays and inputs are arguments of the
jit'd function, so nothing is constant-folded. Writes JSON and a markdown table under
`--output_dir`. Off GPU the kernels run in interpret mode (slow; tiny shapes only).
"""

from __future__ import annotations

import dataclasses
import itertools

from absl import app, flags
import jax
import jax.numpy as jnp

from experiments import benchmarking, cli
from pallas_kernels.linear_attention.chunked_plan import BlockSizes

_SEQ = flags.DEFINE_list("seq_lens", ["1024", "65536"], "Sequence lengths.")
_TOKENS = flags.DEFINE_integer("tokens_per_batch", 65536, "batch = tokens_per_batch // seq.")
_HEADS = flags.DEFINE_integer("heads", 16, "Heads.")
_KEY_DIM = flags.DEFINE_integer("key_dim", 128, "Key dimension.")
_VALUE_DIM = flags.DEFINE_integer("value_dim", 128, "Value dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Inputs.")
_FORM = flags.DEFINE_enum("form", "fixed", ["fixed", "scalar", "vector"], "Decay form.")
_PASSES = flags.DEFINE_list("passes", ["fwd"], "fwd and/or fwd_bwd.")
_CHUNKS = flags.DEFINE_list("chunk_sizes", ["64"], "chunk_size values.")
_KERNELS = flags.DEFINE_enum("kernels", "pallas_triton", ["pallas_triton", "triton"],
                             "Which Triton kernels: the Pallas Triton lowering's or the "
                             "Triton-language ones (jax-triton on a GPU).")
_SETTINGS = {  # BlockSizes field → flag; an empty list keeps the default
    name: flags.DEFINE_list(name, [], f"BlockSizes.{name} values (0 for None).")
    for name in ("block_k", "block_v", "num_warps", "num_stages", "pieces",
                 "gradient_block_v", "gradient_num_warps", "gradient_num_stages")
}
_OUT = flags.DEFINE_string("output_dir", "/tmp/tune_linear_attention", "Output folder.")
_TRIALS = flags.DEFINE_integer("trials", 10, "Timed trials per row (median reported).")


def _kernels():
  """The module of `--kernels` (imported on use: `triton` needs the triton package)."""
  if _KERNELS.value == "triton":
    from pallas_kernels.linear_attention import triton  # pylint: disable=g-import-not-at-top
    return triton
  from pallas_kernels.linear_attention import pallas_triton  # pylint: disable=g-import-not-at-top
  return pallas_triton


def _block_sizes():
  """Every combination of the listed settings, as BlockSizes over the backend's default."""
  get_default = getattr(_kernels(), "default_block_sizes", BlockSizes.get_default)
  default = get_default(_KEY_DIM.value, _VALUE_DIM.value, jnp.dtype(_DTYPE.value),
                        vector=_FORM.value == "vector")
  swept = {name: [int(v) or None for v in flag.value]
           for name, flag in _SETTINGS.items() if flag.value}
  for values in itertools.product(*swept.values()):
    yield dataclasses.replace(default, **dict(zip(swept, values)))


def _row(seq, pass_, chunk, blocks, interpret):
  heads, key_dim, value_dim = _HEADS.value, _KEY_DIM.value, _VALUE_DIM.value
  batch, dtype = max(1, _TOKENS.value // seq), jnp.dtype(_DTYPE.value)
  q, k, v, g = benchmarking.linear_attention_inputs(jax.random.key(0), _FORM.value, batch,
                                                    seq, heads, key_dim, value_dim, dtype)
  h0 = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
  resets = jnp.zeros((batch, seq), bool)

  def out(q, k, v, g, h0, resets):
    return _kernels().linear_attention(q, k, v, g, h0, resets, scale=key_dim ** -0.5,
                                       chunk_size=chunk, interpret=interpret,
                                       block_sizes=blocks)[0]
  if pass_ == "fwd":
    fn = jax.jit(out)
  else:
    loss = lambda *args: jnp.sum(out(*args).astype(jnp.float32))
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  row = dict(seq=seq, batch=batch, pass_=pass_, chunk=chunk,
             **{name: getattr(blocks, name) for name in _SETTINGS})
  try:
    seconds = benchmarking.device_time(fn, q, k, v, g, h0, resets, trials=_TRIALS.value)
  except Exception as e:  # a setting the kernels refuse, or out of resources
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return row
  return dict(row, ms=seconds * 1e3, mtok_s=batch * seq / seconds / 1e6)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  interpret = jax.default_backend() != "gpu"
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}"
        + (" (interpret mode)" if interpret else ""))
  columns = ["seq", "batch", "pass_", "chunk", *_SETTINGS, "ms", "mtok_s", "error"]
  header = (f"linear attention launch settings ({_KERNELS.value} kernels), {_FORM.value} "
            f"decay, {_DTYPE.value}, heads "
            f"{_HEADS.value}, key/value dim {_KEY_DIM.value}/{_VALUE_DIM.value}, "
            f"{_TOKENS.value} tokens/batch, {jax.devices()[0].device_kind}")
  rows = []
  for seq, pass_, chunk, blocks in itertools.product(
      map(int, _SEQ.value), _PASSES.value, map(int, _CHUNKS.value), _block_sizes()):
    benchmarking.record(rows, _row(seq, pass_, chunk, blocks, interpret), _OUT.value,
                        "tune_linear_attention", columns, header)
  print(benchmarking.markdown_table(rows, columns))  # the files: written by record


def run():
  cli.run(main, __name__)


if __name__ == "__main__":
  run()
