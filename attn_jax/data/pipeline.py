"""The deterministic, index-based input pipeline: step → this process's rows.

The global stream of examples is the concatenation of epochs; epoch e visits every row of
the split once, in the order `permutation(e)` = `np.random.default_rng([seed, e])
.permutation(num_rows)` (or in stored order with `shuffle=False`). Step s of a global batch
of B rows takes stream positions [s·B, (s+1)·B); a batch that crosses an epoch boundary takes
the end of one epoch and the start of the next, so nothing is dropped. With P processes,
process p takes the contiguous rows [p·B/P, (p+1)·B/P) of that global batch and reads only
those.

So `batch(step)` is a pure function of (dataset, seed, global batch size, step): a run
resumed at step s sees exactly the examples an uninterrupted run would have seen, whatever
the number of processes. `state()` is what a checkpoint keeps to check that; `restore()`
refuses a state saved for other data or another global batch size.

While the caller works on batch s, a background thread reads batch s + 1 (reads are pure,
so a guess that is not used costs only time); all reads run on that one thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Any

import numpy as np

from attn_jax.data import sources

# Epoch permutations kept in memory (a batch spans at most two epochs once B <= num_rows).
_PERMUTATIONS_KEPT = 2


def _as_int(value):
  """numpy integers as Python ints; anything else unchanged (and rejected by the checks)."""
  return int(value) if isinstance(value, np.integer) else value


class Pipeline:
  """Batches of one split for one process. Make it with `make_pipeline`.

  Attributes:
    vocab_size: every token id is in [0, vocab_size).
    seq_len: T, the length of every row.
    num_examples: rows in the split (one epoch).
    global_batch_size: B, rows per step over all processes.
    batch_size: B / process_count, the rows `batch()` returns.
    steps_per_epoch: num_examples // B (an eval loop over the split uses this many steps
      from step 0, with `shuffle=False`).
    dataset: the identity string of the split, kept in `state()`.
  """

  def __init__(self, source: sources.Source, *, global_batch_size: int, seed: int,
               process_index: int, process_count: int, shuffle: bool = True,
               prefetch: bool = True):
    global_batch_size, process_index, process_count = (
        _as_int(global_batch_size), _as_int(process_index), _as_int(process_count))
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
      raise ValueError(f"global_batch_size={global_batch_size!r} is invalid: expected an "
                       "int >= 1")
    if not isinstance(process_count, int) or process_count < 1:
      raise ValueError(f"process_count={process_count!r} is invalid: expected an int >= 1")
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is invalid: expected a "
                       f"multiple of process_count={process_count}")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index!r} is invalid: expected an int in "
                       f"[0, process_count={process_count})")
    if source.num_rows < 1:
      raise ValueError(f"dataset {source.name} has no rows")
    self._source = source
    self.vocab_size = source.vocab_size
    self.seq_len = source.seq_len
    self.num_examples = source.num_rows
    self.dataset = source.name
    self.global_batch_size = global_batch_size
    self.batch_size = global_batch_size // process_count
    self.steps_per_epoch = self.num_examples // global_batch_size
    self.process_index = process_index
    self.process_count = process_count
    self.shuffle = shuffle
    self.seed = int(seed)
    self.step = 0  # The next step `next()` returns; saved by `state()`.
    self._permutations: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._permutations_lock = threading.Lock()
    self._executor = (concurrent.futures.ThreadPoolExecutor(1, "attn_jax_data")
                      if prefetch else None)
    self._pending: dict[int, concurrent.futures.Future] = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._permutations_lock:  # The prefetch thread and the caller may both ask.
      if epoch not in self._permutations:
        rng = np.random.default_rng([self.seed, epoch])
        self._permutations[epoch] = rng.permutation(self.num_examples)
        while len(self._permutations) > _PERMUTATIONS_KEPT:
          self._permutations.popitem(last=False)
      self._permutations.move_to_end(epoch)
      return self._permutations[epoch]

  def example_indices(self, step: int) -> np.ndarray:
    """The split's row indices that `batch(step)` returns, int64 `[batch_size]`."""
    if step < 0:
      raise ValueError(f"step={step} is invalid: expected >= 0")
    start = step * self.global_batch_size + self.process_index * self.batch_size
    positions = np.arange(start, start + self.batch_size, dtype=np.int64)
    if not self.shuffle:
      return positions % self.num_examples
    epochs, offsets = np.divmod(positions, self.num_examples)
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      out[where] = self._permutation(int(epoch))[offsets[where]]
    return out

  def _read(self, step: int) -> dict[str, np.ndarray]:
    return self._source.read(self.example_indices(step))

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's share of global batch `step`.

    Returns:
      "inputs" int32 [b, T], "targets" int32 [b, T] (the next token, 0 where none),
      "loss_mask" float32 [b, T] (1 where the target counts: for MQAR the query positions
      only), "segment_ids" int32 [b, T] (1, 2, … per packed document; all ones when rows
      are not packed; 0 = padding); b = global_batch_size // process_count.
    """
    step = int(step)
    if self._executor is None:
      out = self._read(step)
    else:
      future = self._pending.pop(step, None) or self._executor.submit(self._read, step)
      for stale in self._pending.values():
        stale.cancel()
      self._pending = {step + 1: self._executor.submit(self._read, step + 1)}
      out = future.result()
    self.step = step + 1
    return out

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """`batch(self.step)`: iterating continues from the restored or last-read step."""
    return self.batch(self.step)

  def state(self) -> dict[str, Any]:
    """The pipeline's position, for checkpoints (JSON-serialisable ints and one string).

    `step` is the next step to read and `epoch` the epoch its first row comes from; `seed`,
    `global_batch_size`, `num_examples` and `dataset` identify the stream.
    """
    return {"step": self.step, "epoch": self.step * self.global_batch_size // self.num_examples,
            "seed": self.seed, "global_batch_size": self.global_batch_size,
            "num_examples": self.num_examples, "dataset": self.dataset}

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from a `state()`: sets the seed and the next step.

    Raises:
      ValueError: the state was saved for another dataset, split size or global batch size
        (a resumed run would see other examples); the message names the field.
    """
    for field in ("dataset", "num_examples", "global_batch_size"):
      saved, current = state[field], getattr(self, field)
      if (str(saved) if field == "dataset" else int(saved)) != current:
        raise ValueError(f"state[{field!r}]={saved!r} does not match this pipeline's "
                         f"{field}={current!r}: the checkpoint was written for other data")
    for pending in self._pending.values():
      pending.cancel()
    self._pending = {}
    with self._permutations_lock:
      self.seed = int(state["seed"])
      self._permutations.clear()
    self.step = int(state["step"])

  def close(self) -> None:
    """Stops the prefetch thread (also done at interpreter exit)."""
    if self._executor is not None:
      self._executor.shutdown(wait=True, cancel_futures=True)
      self._executor = None
      self._pending = {}


def make_pipeline(data_config: Any, split: str, global_batch_size: int, seed: int = 0,
                  process_index: int = 0, process_count: int = 1, *, shuffle: bool = True,
                  prefetch: bool = True) -> Pipeline:
  """The input pipeline for `config.data`, building its dataset first if needed.

  Args:
    data_config: `config.data` (see `attn_jax.data.configs`).
    split: "train", "test", … or "eval" (the validation split, else the test split).
    global_batch_size: rows per step over all processes; a multiple of process_count.
    seed: picks the shuffling; batches are a pure function of (data, seed, step).
    process_index, process_count: `jax.process_index()`, `jax.process_count()`.
    shuffle: a new permutation every epoch (True), or the stored order (False, for eval).
    prefetch: read the next step's batch on a background thread.

  Raises:
    ValueError: an unknown dataset, field or split, or a bad value; the message names it.
  """
  source = sources.open_source(data_config, split)
  return Pipeline(source, global_batch_size=global_batch_size, seed=seed,
                  process_index=process_index, process_count=process_count, shuffle=shuffle,
                  prefetch=prefetch)
