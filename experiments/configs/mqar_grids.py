"""Named MQAR grids for `experiments/mqar_grid.py`, and the config of one run of a grid.

A grid is every (cell, d_model, mixer, learning rate); a cell is (seq_len, num_kv_pairs).
Each run is a 2-layer model in Zoology's setup (`zoology/experiments/paper_configs/
iclr24_zoology_figure2/configs.py`): no MLP (identity state mixer), LayerNorm, one head,
learned absolute positions for attention only (`max_position_embeddings = input_seq_len`
for attention, 0 otherwise), long convolutions of length seq_len, vocab 8192, 100,000
training and 3,000 test examples with token 0 as filler, power_a 0.01, batch 512 (256 at
seq_len 256, 128 at 512), learning rates logspace(-4, -2, 4), AdamW with weight decay
0.1, 64 epochs. Where we differ: attention has no dropout (Zoology: 0.1), our warmup
(10 % of the steps) and cosine schedule stand in for Zoology's, and our initialisers.
Zoology's "based" is our "zoology_based": a BaseConv layer (short convolution), then
Based's Taylor linear attention (feature_dim 8, no window), one head.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.configs import mqar


@dataclasses.dataclass(frozen=True)
class Grid:
  cells: tuple[tuple[int, int], ...]     # (seq_len, num_kv_pairs)
  d_models: tuple[int, ...]
  mixers: tuple[str, ...]                # names of experiments/configs/mqar.py variants
  learning_rates: tuple[float, ...]
  epochs: float                          # passes over the training examples
  vocab_size: int = 8192
  num_train_examples: int = 100_000
  num_eval_examples: int = 3_000
  random_non_queries: bool = False


# Zoology's Figure 2 mixers that exist here (its RWKV and H3 do not), then the rest of
# the zoo, so every mixer has a row.
ZOOLOGY_MIXERS = ("softmax", "hyena", "base_conv", "zoology_based", "mamba2")
ZOO = ZOOLOGY_MIXERS + ("based", "swa", "gla", "lightning", "retnet", "hgrn2", "linear",
                        "diff", "mla")

GRIDS = {
    "zoology_figure2": Grid(
        cells=((64, 4), (128, 8), (256, 16), (512, 64)), d_models=(64, 128, 256, 512),
        mixers=ZOO, learning_rates=tuple(float(x) for x in np.logspace(-4, -2, 4)),
        epochs=64),
    # What a CPU can run: two cells, two widths, two learning rates, 8 epochs of 20,000.
    "zoology_figure2_cpu": Grid(
        cells=((64, 4), (128, 8)), d_models=(64, 128), mixers=ZOO,
        learning_rates=(1e-3, 3e-3), epochs=8, num_train_examples=20_000,
        num_eval_examples=1_000),
    # The end-to-end test's grid: seconds on a CPU.
    "smoke": Grid(cells=((32, 2), (48, 4)), d_models=(16,), mixers=("softmax", "base_conv"),
                  learning_rates=(3e-3,), epochs=1, vocab_size=64, num_train_examples=256,
                  num_eval_examples=64),
}


def batch_size(seq_len: int) -> int:
  """Zoology's Figure 2 batch size for a sequence length."""
  return 512 if seq_len <= 128 else 256 if seq_len <= 256 else 128


def run_config(grid: Grid, mixer: str, seq_len: int, num_kv_pairs: int, d_model: int,
               learning_rate: float, *, data_dir: str, max_steps: int | None = None):
  """The training config of one run of `grid`."""
  config = mqar.get_config(mixer)
  batch = min(batch_size(seq_len), grid.num_train_examples)
  steps = max(1, int(grid.epochs * grid.num_train_examples // batch))
  if max_steps:
    steps = min(steps, max_steps)
  config.data.update(dict(
      vocab_size=grid.vocab_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs,
      num_train_examples=grid.num_train_examples,
      num_eval_examples=grid.num_eval_examples,
      random_non_queries=grid.random_non_queries, data_dir=data_dir))
  model = config.model
  model.update(dict(d_model=d_model, num_layers=max(2, len(model.mixers)), num_heads=1,
                    mlp_dim=0, norm="layer"))
  if "softmax" in model.mixers:  # Zoology's attention: learned positions, no RoPE
    model.update(dict(positions="learned", max_len=seq_len))
    model.mixer_options.softmax = {"rope": False}
  model.mixer_options.all.max_len = seq_len
  model.mixer_options.based = {"feature_dim": 8, "window_size": None}
  config.optimizer.update(dict(learning_rate=float(learning_rate), weight_decay=0.1,
                               warmup_steps=max(1, steps // 10)))
  config.train.update(dict(num_steps=steps, global_batch_size=batch,
                           log_every=max(1, steps // 20), eval_every=steps))
  config.eval.global_batch_size = min(250, grid.num_eval_examples)
  config.checkpoint.every = max(1, min(steps, 1000))
  config.tensorboard = False
  return config
