"""Probe: Zoology's optimizer on the CPU grid's (64, 4) cell, softmax, width 64 (issue 18):

    ./dev.sh python docs/results/scripts/2026-12-07-zoology_optimizer_probe.py OUT_DIR

One run (1,250 steps, about a minute on 2 cores); its row in OUT_DIR/results.jsonl.
"""
import dataclasses, os, sys
from experiments import mqar_grid
from experiments.configs import mqar_grids
out = sys.argv[1]
grid = dataclasses.replace(mqar_grids.parts("zoology_figure2_cpu")[0], zoology_optimizer=True,
                           cells=((64, 4),), d_models=(64,))
run = (grid, "softmax", 64, 4, 64, 3e-3)
os.makedirs(out, exist_ok=True)
print(mqar_grid.train_run("probe", run, out, os.path.join(out, "results.jsonl")), flush=True)
