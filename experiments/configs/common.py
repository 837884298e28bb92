"""What every experiment config shares: the layout of `config`, and model sizes.

    config.seed                 parameter init and data order
    config.model                kind, sizes, per-layer `mixers`, mixer_options, dtypes,
                                remat (see `model_config`)
    config.data                 `attn_jax.data` config (name, data_dir, ...)
    config.mesh                 {data, fsdp, tensor, sequence} sizes; -1 fills the rest
    config.sharding_rules       overrides of `attn_jax.sharding.RULES`: ((name, axes), ...)
    config.optimizer            `attn_jax.train.optimizer` fields
    config.train                num_steps, global_batch_size, log_every, eval_every,
                                loss_positions (0: logits everywhere; n: at n per row),
                                stop_accuracy (0: never; a: once eval accuracy > a)
    config.eval                 global_batch_size, num_steps (0: the whole eval split)
    config.checkpoint           every (steps), keep (newest N), async_save
    config.tensorboard          write TensorBoard event files
    config.kernels              the implementation of each op (None: automatic), e.g.
                                --config.kernels.linear_attention=xla; a run option, not
                                part of the model (`attn_jax.ops.dispatch.kernels`)
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Decoder sizes: (d_model, num_layers, num_heads, mlp_dim). Parameter counts are for a
# softmax model with a 32k vocabulary and tied embeddings.
SIZES = {
    "tiny": (64, 2, 2, 128),        # ~0.08M + embeddings: CPU tests and MQAR
    "small": (512, 8, 8, 1408),     # ~26M non-embedding (~42M total)
    "base": (768, 12, 12, 2048),    # ~85M non-embedding (~110M total)
    "medium": (1024, 24, 16, 2816),  # ~310M non-embedding (~340M total)
    "large": (1536, 24, 16, 4096),   # ~680M non-embedding (~730M total)
    "1b": (2048, 20, 16, 5632),     # ~1.03B non-embedding (~1.09B total)
}


def model_config(size="tiny", mixers=("softmax",), *, dtype="float32", remat="none"):
  """`config.model` of a decoder LM of `size` with the per-layer `mixers` pattern."""
  if size not in SIZES:
    raise ValueError(f"size must be one of {sorted(SIZES)}; got {size!r}.")
  d_model, num_layers, num_heads, mlp_dim = SIZES[size]
  return ml_collections.ConfigDict({
      "kind": "decoder",
      "d_model": d_model,
      "num_layers": num_layers,
      "num_heads": num_heads,
      "mlp_dim": mlp_dim,
      "mixers": tuple(mixers),
      # {mixer name: {option: value}}; "all": options for every mixer that takes them.
      # diff: lambda_per_head=True for runs saved before λ was shared (the paper's).
      "mixer_options": {"all": {}, "swa": {"window_size": 64},
                        "diff": {"lambda_per_head": False}},
      "tie_embeddings": True,
      "dtype": dtype,            # compute dtype; parameters and optimizer stay float32
      "param_dtype": "float32",
      "remat": remat,            # none | full | dots | dots_no_batch
      "norm_eps": 1e-6,
      "norm": "rms",             # rms | layer (Zoology's models)
      "positions": "none",       # none | learned (absolute, max_len of them)
      "max_len": 0,
      "embed_dropout": 0.0,      # training only; attention's: mixer option `dropout`
  })


def base_config():
  """Defaults for every field; experiment configs change what they need."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_config()
  config.data = ml_collections.ConfigDict()
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1,
                                           "sequence": 1})
  config.sharding_rules = ()
  config.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 3e-4, "schedule": "cosine", "warmup_steps": 1000,
      "end_learning_rate_fraction": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
      "weight_decay": 0.1, "weight_decay_on": "matrices", "grad_clip_norm": 1.0})
  config.train = ml_collections.ConfigDict({
      "num_steps": 10_000, "global_batch_size": 64, "log_every": 100, "eval_every": 1000,
      # > 0: logits only at that many loss positions per row (MQAR: its pairs), the same
      # loss without the vocabulary projection of the other tokens; 0: every position.
      "loss_positions": 0,
      # > 0: stop once an evaluation's accuracy exceeds it (Zoology's early stop: 0.99).
      "stop_accuracy": 0.0})
  config.eval = ml_collections.ConfigDict({"global_batch_size": 64, "num_steps": 50})
  config.checkpoint = ml_collections.ConfigDict({"every": 1000, "keep": 3,
                                                 "async_save": True})
  config.tensorboard = True
  config.kernels = ml_collections.ConfigDict({  # str or None; None: automatic
      "dot_product_attention": config_dict.placeholder(str),
      "linear_attention": config_dict.placeholder(str)})
  return config
