"""`attn_jax.load` on a workdir the training binary wrote, and the Colab notebook on it."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

import attn_jax
from attn_jax import data, train
from tests.launch.conftest import NUM_STEPS, REPO

NOTEBOOK = REPO / "launch" / "colab" / "load_checkpoint.ipynb"


def test_load_gives_the_trained_model(trained_run):
  model = attn_jax.load(trained_run.workdir)
  config = train.load_config(trained_run.workdir)
  assert train.load_meta(trained_run.workdir)["step"] == NUM_STEPS
  assert list(model.mixers) == ["lightning", "softmax"]
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert num_params == trained_run.num_params

  # The final evaluation read eval batch 0 (config.eval.num_steps=1): the loaded weights
  # must give the loss the run logged.
  pipeline = data.make_pipeline(config.data, "eval", config.eval.global_batch_size,
                                seed=config.seed, shuffle=False, prefetch=False)
  batch = pipeline.batch(0)
  pipeline.close()
  log_probs = np.asarray(jax.nn.log_softmax(model(batch["inputs"], batch["segment_ids"])))
  nll = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
  mask = batch["loss_mask"] > 0
  logged = [m["eval/loss"] for m in trained_run.metrics if "eval/loss" in m][-1]
  np.testing.assert_allclose(nll[mask].mean(), logged, rtol=1e-4)

  # An earlier checkpoint by `step`; a missing one is named.
  earlier = attn_jax.load(trained_run.workdir, step=2)
  assert not np.allclose(earlier.embed.embedding[...], model.embed.embedding[...])
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 3"):
    attn_jax.load(trained_run.workdir, step=3)


def test_notebook_runs_headless_on_cpu(trained_run, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("ATTN_JAX_WORKDIR", str(trained_run.workdir))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  assert "parameters" in notebook.cells[1].metadata.get("tags", [])
  assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
      "commit the notebook without outputs")
  # Runs every cell and raises CellExecutionError (with the traceback) if one fails.
  nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(trained_run.workdir)}}).execute()

  text, images = [], 0
  for cell in notebook.cells:
    for output in cell.get("outputs", []):
      if output.output_type == "stream":
        text.append(output.text)
      images += "image/png" in output.get("data", {})
  text = "".join(text)
  assert f"checkpoint of step {NUM_STEPS} in {trained_run.workdir}" in text
  assert "mixers:\n  - lightning\n  - softmax" in text  # the printed config
  assert f"DecoderLM: {trained_run.num_params:,} parameters" in text
  assert re.search(r"8 examples, 32 target tokens: loss \d+\.\d+, accuracy", text)
  assert re.search(r"answer accuracy \d\.\d+ \(\d+ of 32\)", text)
  assert "recorded 2 op call(s) for 2 layer(s) on 32 tokens" in text
  assert images == 2, "expected an attention-map figure and a decay-profile figure"
