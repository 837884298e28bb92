"""Named MQAR grids for `experiments/mqar_grid.py`, and the config of one run of a grid.

A grid is every (cell, d_model, mixer, learning rate); a cell is (seq_len, num_kv_pairs),
or with `train_slices` the one mix (Based's Figure 2: `(seq_len, 0)`, trained on the mix
and evaluated per eval slice). A mixer entry is an `experiments/configs/mqar.py` variant,
optionally with mixer options: "zoology_based:based.feature_dim=16".

`zoology_figure2`: each run is a 2-layer model in Zoology's setup (`zoology/experiments/paper_configs/
iclr24_zoology_figure2/configs.py`): no MLP (identity state mixer), LayerNorm, one head,
embedding dropout 0.1, attention with biases and dropout 0.1,
learned absolute positions for attention only (`max_position_embeddings = input_seq_len`
for attention, 0 otherwise), long convolutions of length seq_len, vocab 8192, 100,000
training and 3,000 test examples with token 0 as filler, power_a 0.01, batch 512 (256 at
seq_len 256, 128 at 512), learning rates logspace(-4, -2, 4), AdamW with weight decay
0.1 on every parameter, betas (0.9, 0.999), no gradient clipping, a cosine from the peak
rate to 0 without warm-up (Zoology's `CosineAnnealingLR` steps once per epoch; ours per
step), 64 epochs, early stop past 0.99 validation accuracy (`zoology_optimizer`; the CPU
grids keep the settings their committed results were trained with: warm-up over 10 % of
the steps, a cosine to 0.1x the peak, b2 0.98, clipping at norm 1, decay on matrices
only). Where we differ: our initialisers.
Zoology's "based" is our "zoology_based": a BaseConv layer (short convolution), then
Based's Taylor linear attention (feature_dim 8, no window), one head.

`based_figure2` (`zoology/experiments/paper_configs/arxiv24_based_figure2/configs.py`):
the same model setup, with every mixer after a BaseConv layer (Zoology's Hybrid) except
Mamba-2, no learned positions, random filler; trained on the mix of 180,000 examples of
lengths 64-256 and evaluated on seven tasks up to length 1024 (`attn_jax.data.configs`),
batch 256, learning rates logspace(-3, -1.5, 4), 32 epochs; attention and Based at
d_model 64 and 128 (Based also 48 there), Based at feature_dim 8/16/24, sliding windows
8-256 at d_model 128 (Based's code goes to 1024), Mamba-2 at state size 8/16/24.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attn_jax.data.mqar import parse_slices
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
  train_slices: str = ""                 # a mix (see attn_jax.data.configs), or ""
  eval_slices: str = ""
  max_len: int = 0                       # longest sequence a model sees (mixes: eval)
  batch_size: int = 0                    # 0: Zoology's Figure 2 sizes by seq_len
  stop_accuracy: float = 0.99            # Zoology's early stop (evaluated every epoch)
  # Zoology's embedding and attention dropout (0.1) and attention biases; False: neither
  # (the grids' runs before 2026-12-07, e.g. docs/results/based.md's).
  dropout_and_biases: bool = True
  # Zoology's optimizer (`zoology/train.py`): AdamW, weight decay 0.1 on every parameter,
  # betas (0.9, 0.999), no clipping, cosine to 0 without warm-up. False: the grids' runs
  # before 2026-12-07 (warm-up 10 %, cosine to 0.1x, b2 0.98, clip 1, decay on matrices).
  zoology_optimizer: bool = True


# Zoology's Figure 2 mixers that exist here (its RWKV and H3 do not), then the rest of
# the zoo, so every mixer has a row.
ZOOLOGY_MIXERS = ("softmax", "hyena", "base_conv", "zoology_based", "mamba2")
ZOO = ZOOLOGY_MIXERS + ("based", "swa", "gla", "lightning", "retnet", "hgrn2", "linear",
                        "diff", "mla")

_ZOOLOGY_CPU = dict(learning_rates=(3e-3,), epochs=4, vocab_size=128,
                    num_train_examples=20_000, num_eval_examples=1_000, batch_size=64,
                    zoology_optimizer=False)

# A grid, or a union of grids (runs of several shapes in one results table).
GRIDS: dict[str, Grid | tuple[Grid, ...]] = {
    "zoology_figure2": Grid(
        cells=((64, 4), (128, 8), (256, 16), (512, 64)), d_models=(64, 128, 256, 512),
        mixers=ZOO, learning_rates=tuple(float(x) for x in np.logspace(-4, -2, 4)),
        epochs=64),
    # What a 2-core CPU can run (docs/results/zoology.md): Zoology's setup at vocab 128 (the
    # paper: 8,192; at 256 even our default MQAR model learns 4x slower), 20,000 examples,
    # 4 epochs at batch 64 (1,250 steps; early stop at 0.99), one learning rate. In this
    # order (a partial run has the first parts): attention at both widths on the two
    # smaller cells; the rest of the zoo at (128, 8), width 64, so every mixer has a row;
    # Zoology's mixers at width 64 on three cells.
    "zoology_figure2_cpu": (
        Grid(cells=((64, 4), (128, 8)), d_models=(64, 128), mixers=("softmax",),
             **_ZOOLOGY_CPU),
        Grid(cells=((128, 8),), d_models=(64,), mixers=ZOO[len(ZOOLOGY_MIXERS):],
             **_ZOOLOGY_CPU),
        Grid(cells=((64, 4), (128, 8), (256, 16)), d_models=(64,), mixers=ZOOLOGY_MIXERS,
             **_ZOOLOGY_CPU)),
    # The end-to-end test's grid: seconds on a CPU.
    # Based's Figure 2 (`arxiv24_based_figure2/configs.py`): the recall-vs-state frontier.
    # Every model is a BaseConv layer then the mixer, except Mamba-2; random filler.
    "based_figure2": Grid(
        cells=((256, 0),), d_models=(64, 128),
        mixers=("zoology_attention",)
        + tuple(f"zoology_based:based.feature_dim={f}" for f in (8, 16, 24))
        + tuple(f"zoology_swa:swa.window_size={w}" for w in (8, 16, 32, 64, 128, 256))
        + tuple(f"mamba2:mamba2.state_size={n}" for n in (8, 16, 24)),
        learning_rates=tuple(float(x) for x in np.logspace(-3, -1.5, 4)), epochs=32,
        num_train_examples=180_000, num_eval_examples=7_000, random_non_queries=True,
        train_slices="64x4:100000,128x8:20000,256x16:20000,256x32:20000,256x64:20000",
        eval_slices=("64x4:1000,64x8:1000,64x16:1000,128x32:1000,256x64:1000,"
                     "512x128:1000,1024x256:1000"),
        max_len=1024, batch_size=256),
    # What a CPU can run of it in about half an hour: one width, one learning rate, vocab
    # 128 (the default MQAR task's, which a tiny model learns in minutes; the paper: 8,192),
    # a mix of two short slices (15,000 examples, 8 epochs), evaluated up to length 256; the
    # frontier's mixers at two state sizes each, GLA and BaseConv (docs/results/based.md;
    # trained without dropout and attention biases, as those numbers were).
    "based_figure2_cpu": Grid(
        cells=((128, 0),), d_models=(64,),
        mixers=("zoology_attention",)
        + tuple(f"zoology_based:based.feature_dim={f}" for f in (8, 16))
        + tuple(f"zoology_swa:swa.window_size={w}" for w in (16, 64))
        + tuple(f"mamba2:mamba2.state_size={n}" for n in (8, 16))
        + ("zoology_gla", "base_conv"),
        learning_rates=(3e-3,), epochs=8, vocab_size=128, num_train_examples=15_000,
        num_eval_examples=1_500, random_non_queries=True, dropout_and_biases=False,
        zoology_optimizer=False,
        train_slices="64x4:10000,128x8:5000",
        eval_slices="64x4:500,128x8:500,256x16:500", max_len=256, batch_size=128),
    "smoke": Grid(cells=((32, 2), (48, 4)), d_models=(16,), mixers=("softmax", "base_conv"),
                  learning_rates=(3e-3,), epochs=1, vocab_size=64, num_train_examples=256,
                  num_eval_examples=64),
}


def parts(name: str) -> tuple[Grid, ...]:
  """The grids whose union is `GRIDS[name]`."""
  grid = GRIDS[name]
  return grid if isinstance(grid, tuple) else (grid,)


def batch_size(seq_len: int) -> int:
  """Zoology's Figure 2 batch size for a sequence length."""
  return 512 if seq_len <= 128 else 256 if seq_len <= 256 else 128


def parse_mixer(entry: str):
  """"variant[:mixer.option=value,...]" → (variant, {mixer: {option: value}})."""
  variant, _, rest = entry.partition(":")
  options = {}
  for item in filter(None, rest.split(",")):
    key, _, value = item.partition("=")
    mixer, _, option = key.partition(".")
    if not (mixer and option and value):
      raise ValueError(f"mixer entry {entry!r}: options are mixer.option=value; got "
                       f"{item!r}.")
    try:
      parsed = int(value)
    except ValueError:
      parsed = None if value == "None" else float(value)
    options.setdefault(mixer, {})[option] = parsed
  return variant, options


def run_config(grid: Grid, mixer: str, seq_len: int, num_kv_pairs: int, d_model: int,
               learning_rate: float, *, data_dir: str, max_steps: int | None = None):
  """The training config of one run of `grid` (`mixer`: an entry of `grid.mixers`)."""
  variant, options = parse_mixer(mixer)
  config = mqar.get_config(variant)
  batch = min(grid.batch_size or batch_size(seq_len), grid.num_train_examples)
  steps = max(1, int(grid.epochs * grid.num_train_examples // batch))
  if max_steps:
    steps = min(steps, max_steps)
  config.data.update(dict(
      vocab_size=grid.vocab_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs,
      num_train_examples=grid.num_train_examples,
      num_eval_examples=grid.num_eval_examples,
      random_non_queries=grid.random_non_queries, data_dir=data_dir,
      train_slices=grid.train_slices, eval_slices=grid.eval_slices))
  max_len = max(seq_len, grid.max_len)
  if grid.train_slices:  # evaluated per eval slice only: no test split of its own
    config.data.update(dict(num_kv_pairs=1, num_eval_examples=0))
  model = config.model
  model.update(dict(d_model=d_model, num_layers=max(2, len(model.mixers)), num_heads=1,
                    mlp_dim=0, norm="layer"))
  if tuple(model.mixers) == ("softmax",):  # Zoology's attention: learned positions
    model.update(dict(positions="learned", max_len=max_len))
  model.mixer_options.softmax = {"rope": False}  # Zoology's MHA has no RoPE
  if grid.dropout_and_biases:
    # Zoology's MHA: biases on its projections, attention dropout 0.1; every Zoology
    # model: embedding dropout 0.1 (its ModelConfig default).
    model.mixer_options.softmax.update(use_bias=True, dropout=0.1)
    model.embed_dropout = 0.1
  model.mixer_options.all.max_len = max_len
  model.mixer_options.based = {"feature_dim": 8, "window_size": None}
  for name, values in options.items():
    model.mixer_options[name] = {**model.mixer_options.get(name, {}), **values}
  config.optimizer.update(dict(learning_rate=float(learning_rate), weight_decay=0.1,
                               warmup_steps=max(1, steps // 10)))
  if grid.zoology_optimizer:
    config.optimizer.update(dict(warmup_steps=0, end_learning_rate_fraction=0.0, b2=0.999,
                                 grad_clip_norm=0.0, weight_decay_on="all"))
  pairs = [num_kv_pairs] + [kv for text in (grid.train_slices, grid.eval_slices)
                            for _, kv, _ in parse_slices(text, "grid slices")]
  epoch = max(1, grid.num_train_examples // batch)
  config.train.update(dict(num_steps=steps, global_batch_size=batch,
                           log_every=max(1, steps // 20),
                           eval_every=min(epoch, steps) if grid.stop_accuracy else steps,
                           stop_accuracy=grid.stop_accuracy,
                           loss_positions=max(pairs)))  # logits at the queries only
  config.eval.global_batch_size = min(32 if grid.eval_slices else 250,
                                      grid.num_eval_examples)
  config.checkpoint.every = max(1, min(steps, 1000))
  config.tensorboard = False
  return config
