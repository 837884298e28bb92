"""Probe: Zoology's optimizer on the CPU grid's (64, 4) cell, softmax, width 64 (issue 18):

    ./dev.sh python docs/results/scripts/2026-12-07-zoology_optimizer_probe.py OUT_DIR \
        [batch256|paper_budget]

One run, its row in OUT_DIR/results.jsonl: 1,250 steps on the CPU grid's data and batch
(20,000 examples, batch 64; about a minute on 2 cores); with `batch256` 1,250 steps on the
paper's 100,000 training examples at batch 256 (about four minutes); with `paper_budget`
the paper's budget at the CPU grid's vocab 128: 64 epochs of 100,000 examples at batch
512 (12,500 steps, learning rate 2.2e-3, one of the paper's four; early stop past 0.99;
up to about 80 minutes).
"""
import dataclasses, os, sys
from experiments import mqar_grid
from experiments.configs import mqar_grids
out = sys.argv[1]
variant = sys.argv[2] if len(sys.argv) > 2 else ""
grid = dataclasses.replace(mqar_grids.parts("zoology_figure2_cpu")[0], zoology_optimizer=True,
                           cells=((64, 4),), d_models=(64,))
if variant == "batch256":
  grid = dataclasses.replace(grid, batch_size=256, num_train_examples=100_000, epochs=3.2)
elif variant == "paper_budget":
  grid = dataclasses.replace(grid, batch_size=512, num_train_examples=100_000, epochs=64)
elif variant:
  sys.exit(f"unknown variant {variant!r}; expected batch256, paper_budget or nothing")
run = (grid, "softmax", 64, 4, 64, 2.2e-3 if variant == "paper_budget" else 3e-3)
os.makedirs(out, exist_ok=True)
print(mqar_grid.train_run(f"probe{variant}", run, out, os.path.join(out, "results.jsonl")),
      flush=True)
