r"""Where a profiled program's device time goes: `python -m experiments.trace_summary DIR`.

    python -m experiments.bench_training --profile_dir=/tmp/prof   # writes a trace
    python -m experiments.trace_summary /tmp/prof                  # reads the newest one

Reads the Perfetto trace that `jax.profiler.trace(..., create_perfetto_trace=True)`
writes (`DIR/plugins/profile/<run>/perfetto_trace.json.gz`, or that file itself) and
sums the device's time by kernel (GPU: the CUDA stream lines; TPU: the "XLA Ops" line),
by category (attention, matmul, fusions, collectives, copies), and prints both as
markdown tables. Durations are summed per kernel over the whole trace: divide by the
number of profiled steps for per-step figures.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys

# Kernel-name patterns, tried in order; the first that matches names the category.
CATEGORIES = (
    ("attention", r"fmha|flash|cudnn|attention|mha_|sdpa|linear_attention|mosaic_gpu"),
    ("collective", r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]?scatter|all[-_]?to[-_]?all"
                   r"|collective|permute"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|wgmma|cublas|matmul|dot|convolution"),
    ("copy", r"memcpy|memset|copy|transpose"),
    ("fusion", r"fusion|reduce|loop_|input_|scatter|gather|slice|concatenate|broadcast"),
)


def find_trace(path: str) -> str:
  """The Perfetto trace at `path`, or the newest one under it."""
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
  if not found:
    raise FileNotFoundError(
        f"no perfetto_trace.json.gz under {path!r}: profile with "
        "jax.profiler.trace(dir, create_perfetto_trace=True) (bench_training's "
        "--profile_dir does).")
  return max(found, key=os.path.getmtime)


def category(name: str) -> str:
  lowered = name.lower()
  for label, pattern in CATEGORIES:
    if re.search(pattern, lowered):
      return label
  return "other"


def device_kernels(events: list[dict]) -> dict[str, dict[str, tuple[float, int]]]:
  """{device: {kernel name: (total µs, calls)}} from trace events.

  A device is a process named "/device:…". Its kernels are the complete ("X") events on
  its CUDA stream lines (threads named "Stream …") where there are any, else on its
  "XLA Ops" line (TPU); other lines (steps, modules) repeat the same time.
  """
  names, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      names[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  devices = {pid: name for pid, name in names.items() if name.startswith("/device:")}
  lines = collections.defaultdict(set)
  for (pid, tid), name in threads.items():
    if pid in devices and name.startswith("Stream"):
      lines[pid].add(tid)
  for (pid, tid), name in threads.items():
    if pid in devices and not lines[pid] and name == "XLA Ops":
      lines[pid].add(tid)
  totals = {name: collections.defaultdict(lambda: [0.0, 0]) for name in devices.values()}
  for e in events:
    pid = e.get("pid")
    if e.get("ph") == "X" and pid in devices and e.get("tid") in lines[pid]:
      entry = totals[devices[pid]][e["name"]]
      entry[0] += float(e.get("dur", 0.0))
      entry[1] += 1
  return {device: {k: (v[0], v[1]) for k, v in kernels.items()}
          for device, kernels in totals.items()}


def markdown(kernels: dict[str, tuple[float, int]], top: int = 25) -> str:
  """Tables by category and by kernel (the `top` largest), times in ms and shares."""
  total = sum(t for t, _ in kernels.values()) or 1.0
  by_category = collections.defaultdict(float)
  for name, (t, _) in kernels.items():
    by_category[category(name)] += t
  lines = [f"device busy: {total / 1e3:.3f} ms in {sum(n for _, n in kernels.values())} "
           "kernels", "", "| category | ms | share |", "|---|---|---|"]
  for label, t in sorted(by_category.items(), key=lambda kv: -kv[1]):
    lines.append(f"| {label} | {t / 1e3:.3f} | {100 * t / total:.1f} % |")
  lines += ["", "| kernel | category | calls | ms | share |", "|---|---|---|---|---|"]
  ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])
  for name, (t, calls) in ranked[:top]:
    short = name if len(name) <= 80 else name[:77] + "..."
    lines.append(f"| `{short}` | {category(name)} | {calls} | {t / 1e3:.3f} | "
                 f"{100 * t / total:.1f} % |")
  return "\n".join(lines)


def summarize(path: str, top: int = 25) -> str:
  """Markdown summary of every device in the trace at (or newest under) `path`."""
  trace = find_trace(path)
  with gzip.open(trace, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  per_device = device_kernels(events)
  if not per_device:
    return f"{trace}: no device lines (a CPU-only trace has none)."
  return "\n\n".join(f"## {device}\n{trace}\n\n{markdown(kernels, top)}"
                     for device, kernels in sorted(per_device.items()))


def main(argv=None):
  args = sys.argv[1:] if argv is None else argv
  if len(args) != 1:
    raise SystemExit("usage: python -m experiments.trace_summary TRACE_OR_DIR")
  print(summarize(args[0]))


if __name__ == "__main__":
  main()
