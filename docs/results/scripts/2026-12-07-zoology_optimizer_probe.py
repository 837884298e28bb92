"""Probes of the width-64 plateau: Zoology's optimizer on the CPU grid's (64, 4) cell,
softmax attention at width 64 (issue 18):

    ./dev.sh python docs/results/scripts/2026-12-07-zoology_optimizer_probe.py OUT_DIR \
        [batch256|paper_budget|rope|rope_learned|gpt2_embed]

One run, its row in OUT_DIR/results.jsonl: 1,250 steps on the CPU grid's data and batch
(20,000 examples, batch 64; about a minute on 2 cores); with `batch256` 1,250 steps on the
paper's 100,000 training examples at batch 256 (about four minutes); with `paper_budget`
the paper's budget at the CPU grid's vocab 128: 64 epochs of 100,000 examples at batch
512 (12,500 steps, learning rate 2.2e-3, one of the paper's four; early stop past 0.99;
up to about 110 minutes). At the first setting's budget: `rope`, RoPE in place of the
learned positions; `rope_learned`, RoPE beside them; `gpt2_embed`, token and position
embeddings drawn at std 0.02 and not scaled by √d_model (GPT-2's, and Zoology's init;
the output embedding is tied to them).
"""
import dataclasses, os, sys
from attn_jax.models import blocks
from experiments import mqar_grid
from experiments.configs import mqar_grids

VARIANTS = ("", "batch256", "paper_budget", "rope", "rope_learned", "gpt2_embed")
out = sys.argv[1]
variant = sys.argv[2] if len(sys.argv) > 2 else ""
if variant not in VARIANTS:
  sys.exit(f"unknown variant {variant!r}; expected one of {VARIANTS[1:]} or nothing")
grid = dataclasses.replace(mqar_grids.parts("zoology_figure2_cpu")[0], zoology_optimizer=True,
                           cells=((64, 4),), d_models=(64,))
if variant == "batch256":
  grid = dataclasses.replace(grid, batch_size=256, num_train_examples=100_000, epochs=3.2)
elif variant == "paper_budget":
  grid = dataclasses.replace(grid, batch_size=512, num_train_examples=100_000, epochs=64)

run_config = mqar_grids.run_config


def probe_config(*args, **kwargs):
  config = run_config(*args, **kwargs)
  if variant in ("rope", "rope_learned"):
    config.model.mixer_options.softmax = {"rope": True}
  if variant == "rope":
    config.model.positions = "none"
  return config


mqar_grids.run_config = probe_config
if variant == "gpt2_embed":
  embed_init = blocks.Embed.__init__

  def gpt2_init(self, vocab_size, d_model, **kwargs):
    embed_init(self, vocab_size, d_model, **kwargs)
    self.embedding[...] = self.embedding[...] * (0.02 * d_model ** 0.5)  # std 0.02
    self.scale = 1.0

  blocks.Embed.__init__ = gpt2_init
run = (grid, "softmax", 64, 4, 64, 2.2e-3 if variant == "paper_budget" else 3e-3)
os.makedirs(out, exist_ok=True)
print(mqar_grid.train_run(f"probe{variant}", run, out, os.path.join(out, "results.jsonl")),
      flush=True)
