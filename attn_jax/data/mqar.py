"""Multi-query associative recall (MQAR), generated locally as a TFDS builder.

The task of Zoology (Arora, Eyuboglu et al. 2023, "Zoology: Measuring and improving recall in
efficient language models", §3 and App. E). One example of length `seq_len`:

  positions 0 … 2K-1    K = num_kv_pairs key–value pairs `k_1 v_1 k_2 v_2 … k_K v_K`; the
                        keys are K distinct tokens of [1, vocab_size // 2), the values K
                        distinct tokens of [vocab_size // 2, vocab_size).
  positions 2K …        the query region. Each key is asked once, at position `2K + 2 g`,
                        with distinct gaps g ∈ [0, S), S = (seq_len - 2K) // 2, drawn without
                        replacement with P(g) ∝ (g + 1)^(power_a - 1): a power law, so most
                        queries come soon after the pairs, as repeated bigrams do in text
                        (power_a = 1 is uniform; Zoology uses 0.01).
  every other position  a random token of [0, vocab_size) (Zoology's `random_non_queries`,
                        our default and Based's Figure 2 setting), or token 0 with
                        `random_non_queries=False` (Zoology's Figure 2 configs).

Targets are next-token targets: at a query position the target is the value paired with that
key, and `loss_mask` is 1 there and 0 everywhere else, so the loss and the accuracy count the
K query positions only. As in Zoology, the token after a query is noise, not the value.

Example (vocab 16, seq_len 16, 2 pairs; `.` is a random token, `_` no target):

  inputs   3 12  5  9  5  .  .  .  .  .  3  .  .  .  .  .
  targets  _  _  _  _  9  _  _  _  _  _ 12  _  _  _  _  _

A training mix (Based's Figure 2, `train_slices`): the train split holds several tasks
(seq_len_i, num_kv_pairs_i, n_i) one after the other, each example padded at the end to
the config's seq_len (padding: token 0, no target), so one model trains on all of them;
the test split stays the config's own task (evaluate other tasks as their own configs).

Generation is vectorised numpy, seeded by (split, chunk), so the data depend only on the
config. Weighted sampling without replacement uses exponential keys (Efraimidis & Spirakis
2006: the K smallest `E_g / P(g)`, E ~ Exp(1)), which has the same law as drawing one gap at
a time, as Zoology does with `np.random.choice(replace=False, p=...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from attn_jax.data import tfds_compat

# Examples generated per numpy call: bounds the memory of the vectorised key/value draws.
_CHUNK = 1024
_SPLIT_SEEDS = {"train": 0, "test": 1}


@dataclasses.dataclass(eq=False, kw_only=True)
class MqarConfig(tfds.core.BuilderConfig):
  """One MQAR task; `MqarConfig.make(...)` names it from its fields."""
  vocab_size: int = 128
  seq_len: int = 64
  num_kv_pairs: int = 4
  power_a: float = 0.01
  num_train_examples: int = 100_000
  num_eval_examples: int = 1_000
  random_non_queries: bool = True
  train_slices: tuple[tuple[int, int, int], ...] = ()  # (seq_len, num_kv_pairs, examples)

  @classmethod
  def make(cls, *, vocab_size: int, seq_len: int, num_kv_pairs: int, power_a: float,
           num_train_examples: int, num_eval_examples: int, random_non_queries: bool = True,
           train_slices=(), description: str | None = None,
           prefix: str = "") -> MqarConfig:
    """Checks the fields (errors name them, after `prefix`) and names the config (the
    name of a random-filler config is the one it had before the field existed).

    With `train_slices` the train split is their mix and `num_train_examples` must be
    their total."""
    check_mqar_fields(vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs,
                      power_a=power_a, num_train_examples=num_train_examples,
                      num_eval_examples=num_eval_examples, prefix=prefix)
    train_slices = tuple(tuple(int(x) for x in s) for s in train_slices)
    for t, kv, n in train_slices:
      if t > seq_len:
        raise ValueError(f"{prefix}train_slices: a slice of length {t} does not fit "
                         f"seq_len={seq_len}; raise seq_len to the longest slice.")
      check_mqar_fields(vocab_size=vocab_size, seq_len=t, num_kv_pairs=kv, power_a=power_a,
                        num_train_examples=n, num_eval_examples=0,
                        prefix=f"{prefix}train_slices[{t}x{kv}:{n}].")
    if train_slices and sum(n for *_, n in train_slices) != num_train_examples:
      raise ValueError(f"{prefix}num_train_examples={num_train_examples} must be the "
                       f"train_slices' total, {sum(n for *_, n in train_slices)}.")
    if not isinstance(random_non_queries, bool):
      raise ValueError(f"{prefix}random_non_queries={random_non_queries!r} is invalid: "
                       "expected True (random filler tokens) or False (token 0)")
    name = (f"v{vocab_size}-t{seq_len}-kv{num_kv_pairs}-a{float(power_a)!r}"
            f"-n{num_train_examples}-{num_eval_examples}"
            + ("" if random_non_queries else "-zeros"))
    if train_slices:
      name += "-mix" + "".join(f"-{t}x{kv}n{n}" for t, kv, n in train_slices)
    return cls(name=name, description=description, vocab_size=vocab_size, seq_len=seq_len,
               num_kv_pairs=num_kv_pairs, power_a=float(power_a),
               num_train_examples=num_train_examples, num_eval_examples=num_eval_examples,
               random_non_queries=random_non_queries, train_slices=train_slices)


def check_mqar_fields(*, vocab_size, seq_len, num_kv_pairs, power_a, num_train_examples,
                      num_eval_examples, prefix: str = "") -> None:
  """Raises ValueError naming the first field that cannot make an MQAR task."""
  def bad(field, value, expected):
    raise ValueError(f"{prefix}{field}={value!r} is invalid: expected {expected}")
  for field, value in (("vocab_size", vocab_size), ("seq_len", seq_len),
                       ("num_kv_pairs", num_kv_pairs)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      bad(field, value, "a positive int")
  for field, value in (("num_train_examples", num_train_examples),
                       ("num_eval_examples", num_eval_examples)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
      bad(field, value, "an int >= 0 (0: no such split)")
  if not isinstance(power_a, (int, float)) or not power_a > 0:
    bad("power_a", power_a, "a float > 0 (Zoology uses 0.01; 1.0 is uniform)")
  if num_kv_pairs > vocab_size // 2 - 1:
    bad("num_kv_pairs", num_kv_pairs,
        f"at most vocab_size // 2 - 1 = {vocab_size // 2 - 1} distinct keys "
        f"(vocab_size={vocab_size})")
  if seq_len < 4 * num_kv_pairs:
    bad("num_kv_pairs", num_kv_pairs,
        f"seq_len >= 4 * num_kv_pairs, room for the pairs and one query slot per key "
        f"(seq_len={seq_len})")


def parse_slices(text: str, field: str) -> tuple[tuple[int, int, int], ...]:
  """"SEQ_LENxPAIRS:EXAMPLES,…" (e.g. "64x4:1000,128x8:500") as (seq_len, pairs, n)."""
  slices = []
  for item in filter(None, (part.strip() for part in text.split(","))):
    try:
      task, n = item.split(":")
      seq_len, pairs = task.lower().split("x")
      slices.append((int(seq_len), int(pairs), int(n)))
    except ValueError:
      raise ValueError(f"{field}={text!r} is invalid: expected SEQ_LENxPAIRS:EXAMPLES items "
                       f"separated by commas, e.g. '64x4:1000,128x8:500'; got {item!r}") from None
  return tuple(slices)


def query_gap_probabilities(num_slots: int, power_a: float) -> np.ndarray:
  """P(gap = g) ∝ (g + 1)^(power_a - 1) for g in [0, num_slots): float64 [num_slots]."""
  p = np.arange(1, num_slots + 1, dtype=np.float64) ** (power_a - 1.0)
  return p / p.sum()


def mqar_examples(num_examples: int, *, vocab_size: int, seq_len: int, num_kv_pairs: int,
                  power_a: float, rng: np.random.Generator,
                  random_non_queries: bool = True) -> dict[str, np.ndarray]:
  """`num_examples` MQAR examples as arrays `[num_examples, seq_len]`; positions that are
  neither a pair nor a query hold random tokens, or 0 without `random_non_queries`.

  Returns:
    "inputs" int32, "targets" int32 (0 where not a query), "loss_mask" float32 (1 exactly
    at the num_kv_pairs query positions of each row).
  """
  n, t, kv = num_examples, seq_len, num_kv_pairs
  half = vocab_size // 2
  # K distinct keys / values per row: the first K of a random permutation of each range.
  keys = rng.permuted(np.broadcast_to(np.arange(1, half), (n, half - 1)), axis=1)[:, :kv]
  values = rng.permuted(np.broadcast_to(np.arange(half, vocab_size), (n, vocab_size - half)),
                        axis=1)[:, :kv]

  num_slots = (t - 2 * kv) // 2
  p = query_gap_probabilities(num_slots, power_a)
  gaps = np.argsort(rng.exponential(size=(n, num_slots)) / p, axis=1)[:, :kv]
  query_pos = 2 * kv + 2 * gaps

  filler = rng.integers(0, vocab_size, size=(n, t))  # drawn either way: same keys, gaps
  inputs = filler if random_non_queries else np.zeros_like(filler)
  inputs[:, 0:2 * kv:2] = keys
  inputs[:, 1:2 * kv:2] = values
  np.put_along_axis(inputs, query_pos, keys, axis=1)
  targets = np.zeros((n, t), np.int32)
  np.put_along_axis(targets, query_pos, values, axis=1)
  loss_mask = np.zeros((n, t), np.float32)
  np.put_along_axis(loss_mask, query_pos, 1.0, axis=1)
  return {"inputs": inputs.astype(np.int32), "targets": targets, "loss_mask": loss_mask}


def _default_configs() -> list[MqarConfig]:
  small = MqarConfig.make(
      vocab_size=128, seq_len=64, num_kv_pairs=4, power_a=0.01, num_train_examples=100_000,
      num_eval_examples=1_000,
      description="Default: small enough for a 2-layer softmax transformer on a CPU.")
  # Zoology's Figure 2 grid: vocab 8192, 100k train / 3k test examples, and token 0 as
  # filler (`random_non_queries=False` in its iclr24_zoology_figure2 configs).
  zoology = [MqarConfig.make(vocab_size=8192, seq_len=t, num_kv_pairs=kv, power_a=0.01,
                             num_train_examples=100_000, num_eval_examples=3_000,
                             random_non_queries=False,
                             description="Zoology (Arora et al. 2023) Figure 2 setting.")
             for t, kv in ((64, 4), (128, 8), (256, 16), (512, 64))]
  return [small, *zoology]


class Mqar(tfds_compat.LocalCodePath, tfds.core.GeneratorBasedBuilder):
  """MQAR (Zoology): generated locally, splits "train" and "test"."""
  name = "mqar"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Zoology's multi-query associative recall."}
  BUILDER_CONFIGS = _default_configs()

  def _info(self) -> tfds.core.DatasetInfo:
    t = self.builder_config.seq_len
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "inputs": tfds.features.Tensor(shape=(t,), dtype=np.int32),
            "targets": tfds.features.Tensor(shape=(t,), dtype=np.int32),
            "loss_mask": tfds.features.Tensor(shape=(t,), dtype=np.float32),
        }),
        citation="Arora, Eyuboglu et al. 2023, Zoology: Measuring and improving recall in "
                 "efficient language models, arXiv:2312.04927.",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    c = self.builder_config
    splits = {}
    if c.num_train_examples:
      splits["train"] = self._generate_examples("train", c.num_train_examples)
    if c.num_eval_examples:
      splits["test"] = self._generate_examples("test", c.num_eval_examples)
    return splits

  def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, dict]]:
    c = self.builder_config
    tasks = [(c.seq_len, c.num_kv_pairs, num_examples)]
    if split == "train" and c.train_slices:
      tasks = c.train_slices
    key = 0
    for task, (seq_len, num_kv_pairs, n) in enumerate(tasks):
      for start in range(0, n, _CHUNK):
        # A single task keeps the seeds it had before mixes existed.
        seed = [_SPLIT_SEEDS[split], start // _CHUNK] + ([task] if c.train_slices else [])
        chunk = mqar_examples(min(_CHUNK, n - start), vocab_size=c.vocab_size,
                              seq_len=seq_len, num_kv_pairs=num_kv_pairs,
                              power_a=c.power_a, rng=np.random.default_rng(seed),
                              random_non_queries=c.random_non_queries)
        for i in range(len(chunk["inputs"])):
          yield key, {k: np.pad(v[i], (0, c.seq_len - seq_len)) for k, v in chunk.items()}
          key += 1
