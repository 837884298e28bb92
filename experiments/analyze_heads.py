r"""Which heads of a trained MQAR model do the work: `python -m experiments.analyze_heads
--workdir=DIR`.

For the model of the workdir's checkpoint (`attn_jax.load`) and fresh examples of its
MQAR task (the config's vocab, length and pairs, drawn with `--seed`), writes to
`--output_dir` (default DIR/analysis):

- `heads.json`: every per-head score (`attn_jax.analysis.heads.SCORES`: sink, retrieval,
  induction, entropy, mean distance), importance (`analysis.importance.head_importance`:
  |∂loss/∂mask| and the loss and accuracy change of masking each head alone), ablation
  (MQAR accuracy with the top-k retrieval heads masked, against k random heads, mean over
  `--random_draws`), the pruning curve (heads removed least important first, and at
  random), and the KV-cache comparison (accuracy and memory of the full cache, of
  DuoAttention-style per-head caches keeping the top-k retrieval heads' KV heads full and
  `--sinks` + `--window` for the rest, and of StreamingLLM's uniform sinks + window given
  the same number of cache slots).
- `scores.png` (layer × head heatmap per score), `maps.png` (the attention maps of the
  top retrieval, sink and induction heads on one example), `pruning.png`, `cache.png`.

Prints a progress bar and, at the end, the ablation and cache tables. docs/analysis.md
shows it on the default MQAR model:

    python -m experiments.train --workdir=/tmp/mqar
    python -m experiments.analyze_heads --workdir=/tmp/mqar
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained MQAR workdir.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results go (default: "
                                  "WORKDIR/analysis).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 512, "MQAR examples for accuracy "
                                     "(importance, ablation, pruning, caches).")
_MAP_EXAMPLES = flags.DEFINE_integer("map_examples", 32, "Examples whose attention maps "
                                     "are captured for the scores.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Examples per evaluation batch.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Heads ablated / kept full at most (0: a "
                              "quarter of all heads, at least 1).")
_SINKS = flags.DEFINE_integer("sinks", 4, "Sink tokens a streaming cache keeps.")
_WINDOW = flags.DEFINE_integer("window", 4, "Recent tokens a streaming head keeps in the "
                               "per-head policy.")
_RANDOM_DRAWS = flags.DEFINE_integer("random_draws", 5, "Random head sets per k.")
_SEED = flags.DEFINE_integer("seed", 1234, "Seed of the examples and the random heads.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  for name in ("num_examples", "map_examples", "batch_size", "window", "random_draws"):
    if flags.FLAGS[name].value < 1:
      raise app.UsageError(f"--{name} must be ≥ 1; got {flags.FLAGS[name].value}.")
  if _SINKS.value < 0 or _TOP_K.value < 0:
    raise app.UsageError("--sinks and --top_k must be ≥ 0.")
  from attn_jax import train  # pylint: disable=g-import-not-at-top
  try:
    config = train.load_config(_WORKDIR.value, _STEP.value)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  if config.data.get("name") != "mqar":
    raise app.UsageError(f"analyze_heads measures MQAR accuracy: the workdir's data is "
                         f"{config.data.get('name')!r}; train with experiments/configs/"
                         "mqar.py.")
  output_dir = _OUTPUT_DIR.value or os.path.join(_WORKDIR.value, "analysis")
  os.makedirs(output_dir, exist_ok=True)
  step = train.load_meta(_WORKDIR.value, _STEP.value)["step"]
  report = analyze(train.load(_WORKDIR.value, step=step), config, output_dir, step)
  print(_tables(report))
  print(f"wrote {output_dir}/heads.json and 4 PNGs")


def analyze(model, config, output_dir, step):
  """Runs every measurement; writes heads.json and the PNGs; returns the report."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  from attn_jax.analysis import heads, importance  # pylint: disable=g-import-not-at-top
  from attn_jax.analysis import scores as score_lib  # pylint: disable=g-import-not-at-top
  model.remat = "none"  # maps are captured eagerly
  rng = np.random.default_rng(_SEED.value)
  examples = _examples(config, _NUM_EXAMPLES.value, rng)
  batches = [{k: v[i:i + _BATCH_SIZE.value] for k, v in examples.items()}
             for i in range(0, _NUM_EXAMPLES.value, _BATCH_SIZE.value)]
  grid = importance.head_grid(model)
  top_k = _TOP_K.value or max(1, grid[0] * grid[1] // 4)
  steps = tqdm.tqdm(total=6, desc="analyze_heads", unit="stage")

  m = min(_MAP_EXAMPLES.value, _NUM_EXAMPLES.value)
  sample = {k: v[:m] for k, v in examples.items()}
  sources = score_lib.mqar_sources(sample["inputs"], sample["targets"], sample["loss_mask"])
  period = config.data.seq_len // 2
  induction = heads.repeated_random_tokens(rng, m, period, 2, model.vocab_size)
  grid_scores = heads.head_scores(model, sample["inputs"], sources=sources,
                                  induction_tokens=induction, induction_period=period)
  steps.update()
  full = importance.evaluate_heads(model, batches)
  imp = importance.head_importance(model, batches)
  steps.update()
  retrieval = np.nan_to_num(grid_scores["retrieval"], nan=-1.0)
  by_retrieval = importance.order_by(retrieval)
  ablation = []
  for k in range(1, top_k + 1):
    random = [importance.evaluate_heads(model, batches, off=importance.random_order(
        grid, seed=_SEED.value + draw)[:k])["accuracy"] for draw in range(_RANDOM_DRAWS.value)]
    ablation.append({"k": k, "heads": by_retrieval[:k],
                     "top_retrieval": importance.evaluate_heads(
                         model, batches, off=by_retrieval[:k])["accuracy"],
                     "random_mean": float(np.mean(random)),
                     "random_min": float(np.min(random))})
  steps.update()
  pruning = {"importance": importance.pruning_curve(
      model, batches, importance.order_by(imp["gradient"], descending=False)),
             "random": importance.pruning_curve(
                 model, batches, importance.random_order(grid, seed=_SEED.value))}
  steps.update()
  cache = _cache_comparison(model, batches, retrieval, top_k, config.data.seq_len)
  steps.update()
  report = {"step": step, "grid": list(grid), "top_k": top_k,
            "examples": _NUM_EXAMPLES.value, "full": full,
            "scores": {k: v.tolist() for k, v in grid_scores.items()},
            "importance": {k: v.tolist() for k, v in imp.items()},
            "ablation": ablation, "pruning": pruning, "cache": cache}
  with open(os.path.join(output_dir, "heads.json"), "w") as f:
    json.dump(report, f, indent=1)
  _plots(output_dir, model, sample["inputs"][:1], induction[:1], grid_scores, report)
  steps.update()
  steps.close()
  return report


def _examples(config, n, rng):
  from attn_jax.data.mqar import mqar_examples  # pylint: disable=g-import-not-at-top
  d = config.data
  return mqar_examples(n, vocab_size=d.vocab_size, seq_len=d.seq_len,
                       num_kv_pairs=d.num_kv_pairs, power_a=d.power_a, rng=rng,
                       random_non_queries=d.get("random_non_queries", True))


def _accuracy_under(model, batches, policy):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from attn_jax.models.generate import decode_logits  # pylint: disable=g-import-not-at-top
  from attn_jax.train.step import token_metrics  # pylint: disable=g-import-not-at-top
  correct = count = 0.0
  for batch in batches:
    sums = jax.jit(token_metrics)(decode_logits(model, batch["inputs"], policy),
                                  jnp.asarray(batch["targets"]),
                                  jnp.asarray(batch["loss_mask"]))
    correct, count = correct + float(sums["correct"]), count + float(sums["count"])
  return correct / max(count, 1.0)


def _cache_comparison(model, batches, retrieval, top_k, seq_len):
  """Rows of {policy, heads kept full, memory fraction, accuracy}: full, then for each k
  the per-head policy and the uniform sinks + window policy with the same cache slots."""
  from attn_jax.layers import kv_policy  # pylint: disable=g-import-not-at-top
  from attn_jax.models.generate import kv_cache_memory  # pylint: disable=g-import-not-at-top
  kv_heads = {getattr(b.mixer, "num_kv_heads", b.mixer.num_heads) for b in model.blocks
              if hasattr(b.mixer, "num_heads")}
  num_kv_heads = kv_heads.pop() if len(kv_heads) == 1 else None
  memory = lambda p: kv_cache_memory(model, batch_size=1, max_len=seq_len,
                                     cache_policy=p)["fraction_of_full"]
  sinks, window = _SINKS.value, _WINDOW.value
  rows = [{"policy": "full", "k": 0, "memory": 1.0,
           "accuracy": _accuracy_under(model, batches, kv_policy.full())}]
  layers = len(model.blocks)
  for k in range(0, top_k + 1):
    chosen = kv_policy.top_full_heads(retrieval, k, num_kv_heads=num_kv_heads) if k else {}
    per_head = kv_policy.per_head(sinks, window, chosen)
    fraction = memory(per_head)
    rows.append({"policy": str(per_head), "k": k, "memory": fraction,
                 "accuracy": _accuracy_under(model, batches, per_head)})
    slots = int(round(fraction * seq_len))  # the same slots per KV head, spread evenly
    if slots > sinks and slots < seq_len and layers:
      uniform = kv_policy.sinks_window(sinks, slots - sinks)
      rows.append({"policy": str(uniform), "k": k, "memory": memory(uniform),
                   "accuracy": _accuracy_under(model, batches, uniform)})
  return rows


def _plots(output_dir, model, tokens, induction, grid_scores, report):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from attn_jax.analysis import heads  # pylint: disable=g-import-not-at-top

  names = list(grid_scores)
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
  for ax, name in zip(axes[0], names):
    image = ax.imshow(grid_scores[name], cmap="viridis", aspect="auto")
    ax.set(title=name, xlabel="head", ylabel="layer")
    fig.colorbar(image, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(os.path.join(output_dir, "scores.png"), dpi=110)
  plt.close(fig)

  maps, induction_maps = heads.layer_maps(model, tokens), heads.layer_maps(model, induction)
  chosen = []
  for name, source in (("retrieval", maps), ("sink", maps), ("induction", induction_maps)):
    values = np.nan_to_num(grid_scores[name], nan=-np.inf)
    layer, head = np.unravel_index(np.argmax(values), values.shape)
    if np.isfinite(values[layer, head]) and int(layer) in source:
      chosen.append((name, int(layer), int(head), source[int(layer)][0, head]))
  if chosen:
    fig, axes = plt.subplots(1, len(chosen), figsize=(3.6 * len(chosen), 3.4), squeeze=False)
    for ax, (name, layer, head, p) in zip(axes[0], chosen):
      ax.imshow(np.asarray(p), cmap="magma")
      ax.set(title=f"top {name}: layer {layer} head {head}", xlabel="key", ylabel="query")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "maps.png"), dpi=110)
    plt.close(fig)

  fig, ax = plt.subplots(figsize=(4.6, 3.4))
  for label, curve in report["pruning"].items():
    ax.plot([p["fraction"] for p in curve], [p["accuracy"] for p in curve], marker="o",
            label=f"by {label}" if label == "importance" else label)
  ax.set(xlabel="fraction of heads masked", ylabel="MQAR accuracy")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(output_dir, "pruning.png"), dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(4.6, 3.4))
  for kind, marker in (("per_head", "o"), ("sinks_window", "s")):
    rows = sorted((r["memory"], r["accuracy"]) for r in report["cache"]
                  if r["policy"].startswith(kind))
    if rows:
      ax.plot(*zip(*rows), marker=marker, label=kind)
  ax.axhline(report["cache"][0]["accuracy"], color="gray", linestyle="--", label="full")
  ax.set(xlabel="KV-cache memory (fraction of full)", ylabel="MQAR accuracy")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(output_dir, "cache.png"), dpi=110)
  plt.close(fig)


def _tables(report):
  lines = [f"full accuracy {report['full']['accuracy']:.4f} on {report['examples']} "
           f"examples; heads {report['grid'][0]} x {report['grid'][1]}", "",
           "| k | heads masked (top retrieval) | accuracy | k random: mean | min |",
           "|---|---|---|---|---|"]
  for row in report["ablation"]:
    heads_text = " ".join(f"L{l}H{h}" for l, h in row["heads"])
    lines.append(f"| {row['k']} | {heads_text} | {row['top_retrieval']:.4f} | "
                 f"{row['random_mean']:.4f} | {row['random_min']:.4f} |")
  lines += ["", "| cache policy | memory (of full) | accuracy |", "|---|---|---|"]
  for row in report["cache"]:
    lines.append(f"| {row['policy']} | {row['memory']:.3f} | {row['accuracy']:.4f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
