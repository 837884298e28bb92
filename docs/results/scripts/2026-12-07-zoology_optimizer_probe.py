"""Probe: Zoology's optimizer on the CPU grid's (64, 4) cell, softmax, width 64 (issue 18):

    ./dev.sh python docs/results/scripts/2026-12-07-zoology_optimizer_probe.py OUT_DIR [batch256]

One run of 1,250 steps, its row in OUT_DIR/results.jsonl: the CPU grid's data and batch
(20,000 examples, batch 64; about a minute on 2 cores), or with `batch256` the paper's
100,000 training examples at batch 256 (about four minutes).
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
elif variant:
  sys.exit(f"unknown variant {variant!r}; expected batch256 or nothing")
run = (grid, "softmax", 64, 4, 64, 3e-3)
os.makedirs(out, exist_ok=True)
print(mqar_grid.train_run(f"probe{variant}", run, out, os.path.join(out, "results.jsonl")),
      flush=True)
