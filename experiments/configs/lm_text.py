"""A language model on local text files (byte tokens by default).

    python -m experiments.train --config=experiments/configs/lm_text.py \
        --config.data.path='~/corpus/*.txt' --workdir=workdirs/lm_text
    python -m experiments.train --config=experiments/configs/lm_text.py:base \
        --config.data.path=... --config.mesh.fsdp=8          # ~110M on 8 GPUs

The variant is a model size of `common.SIZES` (default "small"; "tiny" runs on a CPU).
Mixers: `--config.model.mixers="('lightning',)*7+('softmax',)"` is not parsed as Python;
give the tuple literally, e.g. `"('gla','gla','softmax')"`.
"""

from __future__ import annotations

from attn_jax import data
from experiments.configs import common


def get_config(variant: str = "small"):
  size = variant or "small"
  config = common.base_config()
  on_accelerator = size not in ("tiny",)
  config.model = common.model_config(size, ("softmax",),
                                     dtype="bfloat16" if on_accelerator else "float32",
                                     remat="dots_no_batch" if on_accelerator else "none")
  config.data = data.default_text_config()
  config.data.seq_len = 1024 if on_accelerator else 128
  config.optimizer.learning_rate = 3e-4 if size != "tiny" else 1e-3
  config.optimizer.warmup_steps = 1000 if on_accelerator else 100
  config.train.num_steps = 20_000 if on_accelerator else 2000
  config.train.global_batch_size = 128 if on_accelerator else 16
  config.eval.global_batch_size = 128 if on_accelerator else 16
  config.eval.num_steps = 20
  return config
