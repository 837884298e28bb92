"""A TFDS dataset of documents (like lm1b), tokenized and packed when read; concurrent builds."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from attn_jax import data
from attn_jax.data import tfds_compat

_RNG = np.random.default_rng(0)
TRAIN_DOCS = ["".join(chr(c) for c in _RNG.integers(97, 123, size=n))
              for n in _RNG.integers(2, 20, size=60)]


class AttnJaxTestDocs(tfds_compat.LocalCodePath, tfds.core.GeneratorBasedBuilder):
  """Stands in for lm1b: a "text" feature, splits train and validation."""
  name = "attn_jax_test_docs"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(TRAIN_DOCS),
            "validation": self._generate_examples(TRAIN_DOCS[:6])}

  def _generate_examples(self, docs):
    for i, doc in enumerate(docs):
      yield i, {"text": doc}


def _config(tmp_path, **fields):
  config = data.default_tfds_text_config("attn_jax_test_docs")
  config.data_dir = str(tmp_path)
  config.update(seq_len=32, **fields)
  return config


def _is_substring_of_a_doc(tokens):
  text = bytes(tokens.astype(np.uint8)).decode()
  return any(text in doc for doc in TRAIN_DOCS)


@pytest.mark.parametrize("pack,docs_per_row", [(True, 0), (True, 5), (False, 0)])
def test_documents_packed_when_read(tmp_path, pack, docs_per_row):
  p = data.make_pipeline(_config(tmp_path, pack=pack, docs_per_row=docs_per_row), "train",
                         global_batch_size=4, prefetch=False)
  mean_len = np.mean([len(d) for d in TRAIN_DOCS])
  k = (docs_per_row or max(1, round(32 / mean_len))) if pack else 1
  assert p.num_examples == len(TRAIN_DOCS) // k and p.vocab_size == 256
  assert f"/d{k}" in p.dataset
  seen = 0
  for step in range(p.num_examples // 4):
    rows = p.batch(step)
    for x, y, m, seg in zip(rows["inputs"], rows["targets"], rows["loss_mask"],
                            rows["segment_ids"]):
      assert seg.max() <= k
      for s in range(1, seg.max() + 1):
        pos = np.nonzero(seg == s)[0]
        assert _is_substring_of_a_doc(x[pos])
        np.testing.assert_array_equal(y[pos[:-1]], x[pos[1:]])
        assert m[pos[-1]] == 0 and m[pos[:-1]].all()
      seen += int((seg > 0).any())
  assert seen == 4 * (p.num_examples // 4)
  eval_pipeline = data.make_pipeline(_config(tmp_path, pack=pack), "eval", 2)
  assert eval_pipeline.dataset.startswith("attn_jax_test_docs/1.0.0/validation")


def test_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match="text_key='content'"):
    data.make_pipeline(_config(tmp_path, text_key="content"), "train", 2)
  with pytest.raises(ValueError, match="docs_per_row=-1"):
    data.make_pipeline(_config(tmp_path, docs_per_row=-1), "train", 2)
  with pytest.raises(ValueError, match="config.data.download"):
    data.make_pipeline(_config(tmp_path / "empty", download=False), "train", 2)


_BUILD = """
import sys
from attn_jax import data
config = data.default_mqar_config()
config.update(data_dir=sys.argv[1], num_train_examples=2000, num_eval_examples=10)
p = data.make_pipeline(config, "train", global_batch_size=8, prefetch=False)
print(p.batch(3)["inputs"].sum())
"""


def test_concurrent_processes_build_once(tmp_path):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  procs = [subprocess.Popen([sys.executable, "-c", _BUILD, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = [proc.communicate(timeout=120) for proc in procs]
  assert [proc.returncode for proc in procs] == [0, 0], outs[0][1][-2000:]
  assert outs[0][0].splitlines()[-1] == outs[1][0].splitlines()[-1]  # The same batch.
  builds = sum(out.count("Downloading and preparing dataset") for out, _ in outs)
  assert builds == 1, "the dataset was generated more than once"
