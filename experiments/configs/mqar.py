"""Multi-query associative recall (Zoology), the default experiment: runs on any CPU.

    python -m experiments.train                                   # softmax, this config
    python -m experiments.train --config=experiments/configs/mqar.py:gla
    python -m experiments.train --config=experiments/configs/mqar.py:hybrid \
        --config.train.num_steps=3000

The variant after ':' is a mixer name of `attn_jax.layers.REGISTRY` (softmax, swa, gla,
based, lightning, retnet, hgrn2, mamba2, linear, mla, diff, base_conv, hyena) or a named
hybrid:
"hybrid" (MiniMax-style lightning, softmax), "griffin" (hgrn2, hgrn2, swa),
"based_hybrid" (based, swa), "zoology_based" (base_conv, based: Zoology's "based"),
"zoology_attention", "zoology_swa" and "zoology_gla" (base_conv, then softmax, swa or
gla: Based's Figure 2). Every model is the tiny size (d_model 64, 2 layers), except "heads": softmax
attention with 8 heads of 16 (d_model 128) on 128 tokens with 8 pairs, 1,000 steps (about
20 minutes on 2 CPU cores), the model `experiments/analyze_heads.py` is shown on in
docs/analysis.md.
"""

from __future__ import annotations

from attn_jax import data
from experiments.configs import common

HYBRIDS = {
    "hybrid": ("lightning", "softmax"),
    "griffin": ("hgrn2", "hgrn2", "swa"),
    "based_hybrid": ("based", "swa"),
    # Zoology's Hybrid mixer takes configs[layer_idx % len(configs)]: its "based" model
    # is a BaseConv layer, then a Based layer (Zoology's Figure 2, Based's Figure 2).
    "zoology_based": ("base_conv", "based"),
    # Based's Figure 2 pairs every mixer with a BaseConv layer the same way.
    "zoology_attention": ("base_conv", "softmax"),
    "zoology_swa": ("base_conv", "swa"),
    "zoology_gla": ("base_conv", "gla"),
}


def get_config(variant: str = "softmax"):
  config = common.base_config()
  variant = variant or "softmax"
  mixers = HYBRIDS.get(variant, ("softmax",) if variant == "heads" else (variant,))
  config.model = common.model_config("tiny", mixers)
  if len(mixers) == 3:
    config.model.num_layers = 3
  # max_len: the long convolutions' filter length (Zoology's l_max = the sequence length).
  config.model.mixer_options.all = {"chunk_size": 16, "max_len": 64}
  config.model.mixer_options.swa = {"window_size": 16}
  config.model.mixer_options.base_conv = {"kernel_size": (3, -1)}  # Zoology's Figure 2
  config.data = data.default_mqar_config()
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.b2 = 0.98
  config.optimizer.weight_decay = 0.01
  config.train.num_steps = 500
  if variant == "heads":
    config.model.update(d_model=128, num_heads=8)
    config.data.update(seq_len=128, num_kv_pairs=8)
    config.train.num_steps = 1000
  config.train.global_batch_size = 64
  config.train.log_every = 25
  config.train.eval_every = 100
  config.eval.global_batch_size = 250
  config.eval.num_steps = 0
  config.checkpoint.every = 100
  return config
