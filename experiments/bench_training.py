r"""Training throughput and MFU of a decoder LM: `python -m experiments.bench_training`.

    python -m experiments.bench_training                      # ~350M softmax LM, seq 2048
    python -m experiments.bench_training --mixers=lightning,lightning,lightning,softmax
    python -m experiments.bench_training --size=tiny --seq_len=128 --global_batch_size=8 \
        --steps=3                                             # a CPU smoke test
    python -m experiments.bench_training --profile_dir=/tmp/prof  # + a kernel breakdown

Times the real jit'd train step (`attn_jax.train.step`, AdamW, sharded by the mesh flags)
on random tokens, after compilation and warm-up, and prints one JSON line.

FLOPs per token: 6·N (N = all parameters, tied embedding included: its output matmul
is real work) plus attention: per softmax layer, QKᵀ and PV cost 4·T·d forward per token
over all T keys, ×3 for forward + backward = 12·T·d (PaLM's count, Chowdhery et al. 2022,
App. B); a causal mask halves what must be computed, 6·T·d. `mfu` uses the causal count
(what a kernel that skips masked blocks must do), `mfu_palm` the full one. Linear mixers
add no T-dependent term (their chunked form is counted approximately by 6·N).
Peak: bf16 dense tensor throughput of the device (`--peak_tflops` to override).
`xla_tflops_per_step` is XLA's own count for the lowered step (its cost analysis before
optimisation): it includes any recomputation and the loss, but counts custom calls
(cuDNN attention) and Pallas kernels as zero; null where the backend gives no analysis
(the CUDA backend of JAX 0.11.2).
"""

from __future__ import annotations

import json
import time

from absl import app, flags, logging

from experiments import cli

_SIZE = flags.DEFINE_string("size", "medium", "Model size (experiments/configs/common.py).")
_MIXERS = flags.DEFINE_list("mixers", ["softmax"], "Per-layer mixer pattern.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
_BATCH = flags.DEFINE_integer("global_batch_size", 16, "Sequences per step.")
_VOCAB = flags.DEFINE_integer("vocab_size", 32_000, "Vocabulary size.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy (none, full, dots, "
                             "dots_no_batch); none is fastest where activations fit.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.",
                               lower_bound=0)
_MESH = flags.DEFINE_string("mesh", "data=-1", "Mesh sizes, e.g. 'fsdp=8' or "
                            "'data=2,tensor=4'.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", None, "If set, profile --profile_steps more steps after timing into "
    "this folder (a Perfetto trace; `python -m experiments.trace_summary DIR` reads it) "
    "and print where the device's time went.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 3, "Steps under the profiler.",
                                      lower_bound=1)
_IMPLEMENTATION = flags.DEFINE_string(
    "implementation", None, "Kernel of every op whose table has it (config.kernels; e.g. "
    "pallas_mosaic_gpu, or cudnn: softmax attention only); default: each op's "
    "auto-selection.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", None, "Attention heads (default: the "
                                  "size's; head_dim = d_model / num_heads).", lower_bound=1)
_DUMP_HLO = flags.DEFINE_string("dump_hlo", None, "If set, write the compiled train "
                                "step's optimized HLO text to this file.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak bf16 TFLOP/s per device (default: "
                           "from the device kind).")

# Dense bf16 tensor-core TFLOP/s per chip.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0,
               "B200": 2250.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
               "TPU v6 lite": 918.0, "TPU v6e": 918.0}


def peak_tflops(device_kind):
  for name, value in PEAK_TFLOPS.items():  # longer, more specific names come first
    if name.lower() in device_kind.lower():
      return value
  return None


def flops_per_token(num_params, model_config, seq_len):
  """`(causal count, PaLM count)` of training FLOPs per token."""
  from attn_jax import models  # pylint: disable=g-import-not-at-top
  mixers = models.expand_mixers(list(model_config.mixers), model_config.num_layers)
  attention_layers = sum(name in ("softmax", "mla", "diff") for name in mixers)
  full = 12 * attention_layers * model_config.d_model * seq_len
  return 6 * num_params + full / 2, 6 * num_params + full


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from attn_jax import sharding  # pylint: disable=g-import-not-at-top
  from attn_jax.ops import dispatch  # pylint: disable=g-import-not-at-top
  from attn_jax.train import state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top
  from experiments.configs import common  # pylint: disable=g-import-not-at-top

  config = common.base_config()
  config.model = common.model_config(_SIZE.value, tuple(_MIXERS.value), dtype=_DTYPE.value,
                                     remat=_REMAT.value)
  if _NUM_HEADS.value:
    config.model.num_heads = _NUM_HEADS.value
  if _IMPLEMENTATION.value:
    ops = [op for op in dispatch.OPS if _IMPLEMENTATION.value in dispatch.kernel_names(op)]
    if not ops:
      raise app.UsageError(f"--implementation={_IMPLEMENTATION.value!r} is no op's; "
                           f"known: {dispatch.IMPLEMENTATIONS}.")
    config.kernels.update({op: _IMPLEMENTATION.value for op in ops})
  config.train.num_steps = 1000
  mesh_sizes = {k: int(v) for k, v in (kv.split("=") for kv in _MESH.value.split(","))}
  mesh = sharding.make_mesh(mesh_sizes)
  setup = state_lib.make_setup(config, vocab_size=_VOCAB.value, mesh=mesh,
                               rules=sharding.RULES)
  num_params = state_lib.count_params(setup.abstract_model)
  shape = (_BATCH.value, _SEQ_LEN.value)
  keys = ("inputs", "targets", "loss_mask")
  train_step = step_lib.make_train_step(setup, {k: shape for k in keys})
  tokens = jax.random.randint(jax.random.key(1), (shape[0], shape[1] + 1), 0, _VOCAB.value)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "loss_mask": jnp.ones(shape, jnp.float32)}
  with jax.set_mesh(mesh), sharding.use_rules(sharding.RULES):
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, shape))
             for k, v in batch.items()}
  state = state_lib.init_state(setup)

  start = time.perf_counter()  # traced, lowered and compiled once
  with (jax.set_mesh(mesh), sharding.use_rules(sharding.RULES),
        dispatch.kernels(**setup.kernels)):
    lowered = train_step.jitted.lower(state, batch)
  xla_flops = (lowered.cost_analysis() or {}).get("flops")  # None where not given (GPU)
  train_step = lowered.compile()
  compile_seconds = time.perf_counter() - start
  if _DUMP_HLO.value:
    with open(_DUMP_HLO.value, "w") as f:
      f.write(train_step.as_text())

  def run_steps(state, steps):  # returns when the last step is done
    metrics = None
    for _ in range(steps):
      state, metrics = train_step(state, batch)
    return jax.block_until_ready((state, metrics))

  state, _ = run_steps(state, _WARMUP.value)
  start = time.perf_counter()
  state, metrics = run_steps(state, _STEPS.value)
  step_seconds = (time.perf_counter() - start) / _STEPS.value

  tokens_per_sec = shape[0] * shape[1] / step_seconds
  causal, palm = flops_per_token(num_params, config.model, _SEQ_LEN.value)
  device_kind = jax.devices()[0].device_kind
  peak = _PEAK.value or peak_tflops(device_kind)
  per_device = tokens_per_sec / jax.device_count()
  result = {
      "device": device_kind, "devices": jax.device_count(), "mesh": dict(mesh.shape),
      "size": _SIZE.value, "mixers": _MIXERS.value, "params": num_params,
      "num_heads": config.model.num_heads, "implementation": _IMPLEMENTATION.value,
      "kernels": setup.kernels,
      "seq_len": _SEQ_LEN.value, "global_batch_size": _BATCH.value, "dtype": _DTYPE.value,
      "remat": _REMAT.value, "compile_s": round(compile_seconds, 1),
      "step_s": step_seconds, "tokens_per_s": tokens_per_sec,
      "tflops_per_device": per_device * causal / 1e12,
      "xla_tflops_per_step": None if xla_flops is None else xla_flops / 1e12,
      "mfu": per_device * causal / (peak * 1e12) if peak else None,
      "mfu_palm": per_device * palm / (peak * 1e12) if peak else None,
      "loss": float(metrics["loss"]), "peak_tflops": peak,
  }
  print(json.dumps(result), flush=True)
  if _PROFILE_DIR.value:
    from experiments import trace_summary  # pylint: disable=g-import-not-at-top
    with jax.profiler.trace(_PROFILE_DIR.value, create_perfetto_trace=True):
      run_steps(state, _PROFILE_STEPS.value)
    print(f"{_PROFILE_STEPS.value} steps profiled:", flush=True)
    print(trace_summary.summarize(_PROFILE_DIR.value), flush=True)


def run():
  cli.run(main, __name__)


if __name__ == "__main__":
  run()
