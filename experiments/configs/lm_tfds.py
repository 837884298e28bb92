"""A language model on a TFDS text dataset (lm1b, c4/en, ...), downloaded when reachable.

    python -m experiments.train --config=experiments/configs/lm_tfds.py:lm1b
    python -m experiments.train --config=experiments/configs/lm_tfds.py:c4/en,1b \
        --config.mesh.fsdp=8 --config.data.tokenizer=sentencepiece:/path/spm.model

The variant is `<dataset>[,<size>]`: a TFDS name (default lm1b) and a model size of
`common.SIZES` (default "base", ~110M; "1b" for ~1.1B on 8+ accelerators).
"""

from __future__ import annotations

from attn_jax import data
from experiments.configs import common


def get_config(variant: str = "lm1b"):
  name, _, size = (variant or "lm1b").partition(",")
  size = size or "base"
  config = common.base_config()
  config.model = common.model_config(size, ("softmax",), dtype="bfloat16",
                                     remat="dots_no_batch")
  config.data = data.default_tfds_text_config(name)
  config.data.seq_len = 512 if name == "lm1b" else 2048
  config.optimizer.learning_rate = 3e-4 if size in ("tiny", "small", "base") else 2e-4
  config.optimizer.warmup_steps = 2000
  config.train.num_steps = 100_000
  config.train.global_batch_size = 256
  config.train.log_every = 100
  config.train.eval_every = 2000
  config.eval.global_batch_size = 256
  config.eval.num_steps = 20
  config.checkpoint.every = 2000
  return config
