"""What the benchmark binaries share: device timing, error measures, tables and plots."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags


def device_time(fn: Callable, *args, warmup: int = 3, trials: int = 15,
                min_trial_seconds: float = 0.05) -> float:
  """Median seconds per call of a jitted `fn(*args)`, measured on a full device queue.

  Each trial enqueues enough back-to-back calls to fill `min_trial_seconds` and blocks once
  at the end, so host dispatch overlaps device work and the figure is the device's time
  per call; the median over `trials` is reported. Compilation and warm-up stay outside.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  single = max(time.perf_counter() - start, 1e-6)
  inner = max(1, int(min_trial_seconds / single))
  times = []
  for _ in range(trials):
    start = time.perf_counter()
    out = None
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / inner)
  return statistics.median(times)


def small_sweep_on_cpu(small: dict[str, str]) -> None:
  """On a CPU backend, gives each flag of `small` (`{name: value as typed}`) that the
  command line did not set its small value, and prints one line saying so.

  The default sweeps are sized for a GPU, far too large to wait for on a CPU. The line
  also gives the flags that restore the default sweep.
  """
  if jax.default_backend() != "cpu":
    return
  unset = [flags.FLAGS[name] for name in small if not flags.FLAGS[name].present]
  if not unset:
    return
  full = " ".join(flag.serialize() for flag in unset)
  for flag in unset:
    setattr(flags.FLAGS, flag.name, flag.parser.parse(small[flag.name]))
  print(f"CPU backend: a small sweep ({' '.join(flag.serialize() for flag in unset)}); "
        f"for the GPU-sized one pass {full}", flush=True)


def implementation(name: str) -> str | None:
  """The op's `implementation` argument for an `--implementations` entry: `auto` is None
  (the op's automatic choice), anything else is passed through."""
  return None if name == "auto" else name


def jit_pass(fn: Callable, pass_: str, argnums: Sequence[int]) -> Callable:
  """`jit(fn)` for pass_ "fwd"; for "fwd_bwd" the jitted gradient, w.r.t. the arguments
  `argnums`, of `sum(fn(*args) * do)`, `do` (float32, fn's output shape) passed last."""
  if pass_ == "fwd":
    return jax.jit(fn)

  def loss(*args_and_do):
    *args, do = args_and_do
    return jnp.sum(fn(*args).astype(jnp.float32) * do)
  return jax.jit(jax.grad(loss, argnums=tuple(argnums)))


def describe_error(e: BaseException) -> str:
  """`Type: first line of the message` (at most 120 characters), for a result row."""
  return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def max_rel_err(x, ref) -> float:
  """max |x − ref| / max |ref|, in float64 (NaN → inf)."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if not np.isfinite(x).all():
    return float("inf")
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def linear_attention_inputs(key, form, batch, seq, heads, key_dim, value_dim, dtype):
  """The linear-attention benchmarks' q, k `[batch, seq, heads, key_dim]`, v (value_dim)
  in `dtype` (keys scaled by key_dim^-1/2) and log decay: "fixed" `[heads]`, "scalar"
  `[batch, seq, heads]` or "vector" `[batch, seq, heads, key_dim]`."""
  kq, kk, kv, kg = jax.random.split(key, 4)
  q = jax.random.normal(kq, (batch, seq, heads, key_dim), dtype)
  k = jax.random.normal(kk, (batch, seq, heads, key_dim), dtype) * key_dim ** -0.5
  v = jax.random.normal(kv, (batch, seq, heads, value_dim), dtype)
  if form == "fixed":  # Lightning's per-head schedule: -(8 / heads) * (h + 1) / 8 ...
    g = -jnp.exp2(-8.0 * (jnp.arange(heads) + 1) / heads)
  else:
    shape = (batch, seq, heads) if form == "scalar" else (batch, seq, heads, key_dim)
    g = jax.nn.log_sigmoid(jax.random.normal(kg, shape) + 4.0)  # GLA-like, mostly near 0
  return q, k, v, g


def write_results(output_dir: str, name: str, rows: Sequence[dict], columns: Sequence[str],
                  header: str) -> None:
  """Writes `name.json` and `name.md` (a markdown table) under output_dir."""
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, f"{name}.json"), "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "rows": list(rows)}, f, indent=1)
  with open(os.path.join(output_dir, f"{name}.md"), "w") as f:
    f.write(f"{header}\n\n{markdown_table(rows, columns)}\n")


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  lines = [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}"]
  for row in rows:
    lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
  return "\n".join(lines)


def record(rows: list[dict], row: dict, output_dir: str, name: str, columns: Sequence[str],
           header: str) -> None:
  """Appends `row`, prints it, and rewrites the JSON and markdown results with every row so
  far, so that a run stopped by a time limit leaves the rows it finished."""
  rows.append(row)
  print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
  write_results(output_dir, name, rows, columns, header)


def plot(output_dir: str, name: str, rows: Sequence[dict], *, x: str, y: str,
         series: Sequence[str], panels: Sequence[str]) -> None:
  """One line per `series` value, one panel per `panels` value, saved as `name.png`."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed; no plot written")
    return
  panel_keys = sorted({tuple(r[p] for p in panels) for r in rows})
  fig, axes = plt.subplots(1, len(panel_keys), figsize=(4.5 * len(panel_keys), 3.6),
                           squeeze=False)
  for ax, key in zip(axes[0], panel_keys):
    sub = [r for r in rows if tuple(r[p] for p in panels) == key and r.get(y)]
    for label in sorted({tuple(r[s] for s in series) for r in sub}):
      pts = sorted((r[x], r[y]) for r in sub if tuple(r[s] for s in series) == label)
      ax.plot(*zip(*pts), marker="o", label=" ".join(map(str, label)))
    ax.set_xscale("log", base=2)
    ax.set_title(" ".join(map(str, key)))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(output_dir, f"{name}.png"), dpi=110)


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
  return str(value)
