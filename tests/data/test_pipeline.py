"""The index-based pipeline: determinism, per-process shares, epochs, checkpoint state."""

import numpy as np
import pytest

from attn_jax import data
from attn_jax.data import packing
from attn_jax.data import sources


def fake_source(num_rows=50, seq_len=4):
  """Row i is all i: a batch shows which rows it holds."""
  def read(indices):
    rows = packing.empty_rows(len(indices), seq_len)
    rows["inputs"][:] = np.asarray(indices)[:, None]
    rows["segment_ids"][:] = 1
    return rows
  return sources.Source(name=f"fake/{num_rows}", num_rows=num_rows, seq_len=seq_len,
                        vocab_size=num_rows, read=read)


def pipeline(seed=0, global_batch_size=8, process_index=0, process_count=1, **kwargs):
  return data.Pipeline(fake_source(**kwargs.pop("source", {})),
                       global_batch_size=global_batch_size, seed=seed,
                       process_index=process_index, process_count=process_count, **kwargs)


def rows_of(batch):
  return batch["inputs"][:, 0].tolist()


@pytest.mark.parametrize("prefetch", [True, False])
def test_pure_function_of_seed_and_step(prefetch):
  a, b = pipeline(prefetch=prefetch), pipeline(prefetch=not prefetch)
  steps = [3, 0, 7, 3, 1, 2]
  for step in steps:
    np.testing.assert_array_equal(a.batch(step)["inputs"], b.batch(step)["inputs"])
  assert rows_of(a.batch(0)) != rows_of(a.batch(1))
  assert rows_of(a.batch(0)) != rows_of(pipeline(seed=1).batch(0))
  a.close()
  b.close()


def test_epochs_are_permutations_and_cross_boundaries():
  p = pipeline(global_batch_size=8, source={"num_rows": 20})
  stream = sum((rows_of(p.batch(s)) for s in range(10)), [])  # 80 rows = 4 epochs.
  epochs = [stream[i:i + 20] for i in range(0, 80, 20)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(20))
  assert epochs[0] != epochs[1]  # A new permutation every epoch.
  # Step 2 holds the last 4 rows of epoch 0 and the first 4 of epoch 1.
  assert rows_of(p.batch(2)) == epochs[0][16:] + epochs[1][:4]
  expected = np.random.default_rng([0, 1]).permutation(20)
  assert epochs[1] == expected.tolist()


def test_no_shuffle_is_stored_order():
  p = pipeline(shuffle=False, global_batch_size=6, source={"num_rows": 10})
  assert rows_of(p.batch(0)) == [0, 1, 2, 3, 4, 5]
  assert rows_of(p.batch(1)) == [6, 7, 8, 9, 0, 1]
  assert p.steps_per_epoch == 1


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shares_concatenate_to_global_batch(process_count):
  whole = pipeline(global_batch_size=16)
  shares = [pipeline(global_batch_size=16, process_index=i, process_count=process_count)
            for i in range(process_count)]
  for step in (0, 5, 13):
    got = [s.batch(step) for s in shares]
    assert all(g["inputs"].shape == (16 // process_count, 4) for g in got)
    for key, value in whole.batch(step).items():
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), value)


def test_restore_round_trip():
  run = pipeline(seed=3)
  for _ in range(5):
    next(run)
  state = run.state()
  assert state == {"step": 5, "epoch": 0, "seed": 3, "global_batch_size": 8,
                   "num_examples": 50, "dataset": "fake/50"}
  resumed = pipeline(seed=0)
  resumed.restore(state)
  assert resumed.state() == state
  for _ in range(10):  # Crosses into epoch 1 like the uninterrupted run.
    np.testing.assert_array_equal(next(resumed)["inputs"], next(run)["inputs"])
  assert run.state()["epoch"] == 15 * 8 // 50


@pytest.mark.parametrize("field,value", [("dataset", "other/50"), ("num_examples", 49),
                                         ("global_batch_size", 16)])
def test_restore_refuses_other_data(field, value):
  state = pipeline().state()
  state[field] = value
  with pytest.raises(ValueError, match=field):
    pipeline().restore(state)


@pytest.mark.parametrize("kwargs,field", [
    ({"global_batch_size": 6, "process_count": 4}, "global_batch_size"),
    ({"global_batch_size": 0}, "global_batch_size"),
    ({"process_index": 2, "process_count": 2}, "process_index"),
    ({"process_count": 0}, "process_count")])
def test_bad_arguments_are_named(kwargs, field):
  with pytest.raises(ValueError, match=field):
    pipeline(**kwargs)


def test_negative_step_is_named():
  with pytest.raises(ValueError, match="step=-1"):
    pipeline(prefetch=False).batch(-1)


@pytest.mark.parametrize("config,field", [
    ({"name": "no_such_dataset_xyz"}, "name"),
    ({"name": ""}, "name"),
    ({"name": "mqar", "num_kv_pair": 4}, "num_kv_pair"),
    ({"name": "mqar", "seq_len": "64"}, "seq_len"),
    ({"name": "text_files", "path": ""}, "path"),
    ({"name": "text_files", "tokenizer": "bpe"}, "tokenizer")])
def test_bad_config_is_named(config, field, tmp_path):
  config = {"data_dir": str(tmp_path), **config}
  if config["name"] == "text_files" and config.get("tokenizer"):
    (tmp_path / "a.txt").write_text("hello")
    config["path"] = str(tmp_path / "a.txt")
  with pytest.raises(ValueError, match=field):
    data.make_pipeline(config, "train", global_batch_size=4)


def test_unknown_split_is_named(tmp_path):
  config = data.default_mqar_config()
  config.update(data_dir=str(tmp_path), num_train_examples=8, num_eval_examples=0)
  with pytest.raises(ValueError, match="split='validation'"):
    data.make_pipeline(config, "validation", global_batch_size=4)
  with pytest.raises(ValueError, match="split='eval'"):  # No eval split at all.
    data.make_pipeline(config, "eval", global_batch_size=4)
