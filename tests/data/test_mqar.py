"""MQAR (Zoology): generated examples satisfy the task's definition; the builder's configs."""

import os

import ml_collections
import numpy as np
import pytest

from attn_jax import data
from attn_jax.data import mqar
from attn_jax.data import sources
from attn_jax.train import config_check


def check_mqar_rows(rows, *, vocab_size, seq_len, num_kv_pairs):
  """Asserts the definition in attn_jax/data/mqar.py for every row of `rows`."""
  inputs, targets, mask = rows["inputs"], rows["targets"], rows["loss_mask"]
  k, half = num_kv_pairs, vocab_size // 2
  assert inputs.shape[1] == seq_len and inputs.dtype == np.int32
  assert ((0 <= inputs) & (inputs < vocab_size)).all()
  for x, y, m in zip(inputs, targets, mask):
    keys, values = x[0:2 * k:2], x[1:2 * k:2]
    assert len(set(keys)) == k and ((1 <= keys) & (keys < half)).all()
    assert len(set(values)) == k and ((half <= values) & (values < vocab_size)).all()
    (query_pos,) = np.nonzero(m)
    # One query per key, in the query region, at even offsets from its start.
    assert len(query_pos) == k and set(np.unique(m)) == {0.0, 1.0}
    assert (query_pos >= 2 * k).all() and ((query_pos - 2 * k) % 2 == 0).all()
    assert sorted(x[query_pos]) == sorted(keys)
    value_of = dict(zip(keys, values))
    for p in query_pos:  # The target after a query is the value paired with its key earlier.
      assert y[p] == value_of[x[p]]
    assert not y[m == 0].any()


@pytest.mark.parametrize("vocab_size,seq_len,num_kv_pairs,power_a",
                         [(16, 16, 2, 0.01), (128, 64, 4, 0.01), (64, 65, 8, 1.0),
                          (8192, 256, 16, 0.01), (9, 12, 3, 0.5)])
def test_examples_satisfy_definition(vocab_size, seq_len, num_kv_pairs, power_a):
  rows = mqar.mqar_examples(200, vocab_size=vocab_size, seq_len=seq_len,
                            num_kv_pairs=num_kv_pairs, power_a=power_a,
                            rng=np.random.default_rng(0))
  check_mqar_rows(rows, vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs)


def test_query_gaps_follow_power_law():
  k, t = 4, 64
  rows = mqar.mqar_examples(4000, vocab_size=128, seq_len=t, num_kv_pairs=k, power_a=0.01,
                            rng=np.random.default_rng(1))
  gaps = (np.nonzero(rows["loss_mask"])[1] - 2 * k) // 2
  counts = np.bincount(gaps, minlength=(t - 2 * k) // 2)
  # Draws without replacement flatten the law; still, early gaps are far more frequent.
  assert counts[0] > 2 * counts[-1] and counts[:5].sum() > counts[-5:].sum() * 2
  p = mqar.query_gap_probabilities(28, 0.01)
  np.testing.assert_allclose(p.sum(), 1.0)
  assert (np.diff(p) < 0).all()
  np.testing.assert_allclose(mqar.query_gap_probabilities(10, 1.0), 0.1)


def test_zero_filler_keeps_pairs_and_queries():
  """`random_non_queries=False` (Zoology's Figure 2): token 0 between pairs and queries,
  everything else as with random filler from the same generator."""
  kwargs = dict(vocab_size=64, seq_len=40, num_kv_pairs=4, power_a=0.01)
  rand = mqar.mqar_examples(50, rng=np.random.default_rng(5), **kwargs)
  zero = mqar.mqar_examples(50, rng=np.random.default_rng(5), random_non_queries=False,
                            **kwargs)
  kept = np.zeros(rand["inputs"].shape, bool)
  kept[:, :8] = True
  kept |= rand["loss_mask"] > 0
  np.testing.assert_array_equal(zero["inputs"][kept], rand["inputs"][kept])
  assert not zero["inputs"][~kept].any() and rand["inputs"][~kept].any()
  for key in ("targets", "loss_mask"):
    np.testing.assert_array_equal(zero[key], rand[key])
  check_mqar_rows(zero, vocab_size=64, seq_len=40, num_kv_pairs=4)


def test_zoology_figure2_configs_use_zero_filler():
  zoology = [c for c in mqar.Mqar.BUILDER_CONFIGS if c.vocab_size == 8192]
  assert [(c.seq_len, c.num_kv_pairs) for c in zoology] == [(64, 4), (128, 8), (256, 16),
                                                            (512, 64)]
  assert all(not c.random_non_queries and c.name.endswith("-zeros") for c in zoology)
  default = mqar.Mqar.BUILDER_CONFIGS[0]
  assert default.random_non_queries and default.name == "v128-t64-kv4-a0.01-n100000-1000"


def test_generation_depends_only_on_rng():
  kwargs = dict(vocab_size=64, seq_len=32, num_kv_pairs=4, power_a=0.01)
  a = mqar.mqar_examples(8, rng=np.random.default_rng(3), **kwargs)
  b = mqar.mqar_examples(8, rng=np.random.default_rng(3), **kwargs)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
  config = data.default_mqar_config()
  config.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.update(vocab_size=32, seq_len=24, num_kv_pairs=3, num_train_examples=300,
                num_eval_examples=40, power_a=0.5)
  return config


def test_builder_respects_config(small_config):
  train = data.make_pipeline(small_config, "train", global_batch_size=300, prefetch=False)
  test = data.make_pipeline(small_config, "eval", global_batch_size=40, shuffle=False)
  assert (train.num_examples, test.num_examples) == (300, 40)
  assert train.vocab_size == 32 and train.seq_len == 24
  assert test.dataset.endswith("/test")
  for pipeline in (train, test):
    rows = pipeline.batch(0)
    check_mqar_rows(rows, vocab_size=32, seq_len=24, num_kv_pairs=3)
    np.testing.assert_array_equal(rows["segment_ids"], 1)
    assert rows["loss_mask"].dtype == np.float32 and rows["targets"].dtype == np.int32
  # One epoch of one batch is a permutation of the whole split: no duplicates.
  assert len({r.tobytes() for r in train.batch(0)["inputs"]}) == 300
  test.close()


def test_built_once(small_config):
  data.make_pipeline(small_config, "train", global_batch_size=4, prefetch=False)
  (files,) = [[os.path.join(d, f) for f in fs if "array_record" in f]
              for d, _, fs in os.walk(small_config.data_dir) if "1.0.0" in d and fs]
  mtimes = [os.stat(f).st_mtime_ns for f in files]
  again = data.make_pipeline(small_config, "train", global_batch_size=4, prefetch=False)
  assert [os.stat(f).st_mtime_ns for f in files] == mtimes
  assert again.num_examples == 300


def test_predefined_configs_are_reused():
  default = sources._mqar_builder_config(sources.configs.resolve(data.default_mqar_config()))
  assert default is mqar.Mqar.builder_configs[default.name]
  assert default.name == "v128-t64-kv4-a0.01-n100000-1000"
  assert "v8192-t256-kv16-a0.01-n100000-3000-zeros" in mqar.Mqar.builder_configs


@pytest.mark.parametrize("field,value", [
    ("num_kv_pairs", 40), ("num_kv_pairs", 0), ("vocab_size", 6), ("power_a", 0.0),
    ("num_train_examples", -1), ("seq_len", 10)])
def test_bad_field_is_named(field, value, tmp_path):
  config = data.default_mqar_config()
  config.data_dir = str(tmp_path)
  config.num_kv_pairs = 4
  config[field] = value
  with pytest.raises(ValueError, match=field if field != "seq_len" else "num_kv_pairs"):
    data.make_pipeline(config, "train", global_batch_size=4)
  assert not os.listdir(tmp_path)  # Checked before anything is built.


def test_a_run_saved_before_the_filler_field_still_resumes():
  """Configs saved without `data.random_non_queries` read it as True (their data)."""
  current = ml_collections.ConfigDict({"data": data.default_mqar_config().to_dict()})
  saved = current.to_dict()
  del saved["data"]["random_non_queries"]
  assert config_check.differences(saved, current) == []
  current.data.random_non_queries = False
  assert config_check.differences(saved, current) == [("data.random_non_queries", True, False)]


def test_parse_slices():
  assert mqar.parse_slices("64x4:100, 128X8:20", "f") == ((64, 4, 100), (128, 8, 20))
  assert mqar.parse_slices("", "f") == ()
  with pytest.raises(ValueError, match="config.data.train_slices.*'64x4'"):
    mqar.parse_slices("64x4", "config.data.train_slices")


def test_train_mix_pads_each_slice_to_seq_len(tmp_path):
  config = data.default_mqar_config()
  config.update(data_dir=str(tmp_path), vocab_size=32, seq_len=24, num_kv_pairs=3,
                num_eval_examples=8, train_slices="16x2:10,24x3:6", power_a=0.5)
  train = data.make_pipeline(config, "train", global_batch_size=16, shuffle=False,
                             prefetch=False)
  assert (train.num_examples, train.seq_len) == (16, 24)
  rows = train.batch(0)
  short = rows["loss_mask"][:, 16:].sum(axis=1) == 0  # the 16-token slice's padding
  queries = rows["loss_mask"].sum(axis=1)
  assert short.sum() >= 10 and sorted(queries.tolist()) == [2] * 10 + [3] * 6
  assert not rows["inputs"][queries == 2][:, 16:].any()
  config.train_slices = "32x2:5"
  with pytest.raises(ValueError, match="train_slices.*length 32.*seq_len=24"):
    data.make_pipeline(config, "train", global_batch_size=4)
