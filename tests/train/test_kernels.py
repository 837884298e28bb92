"""The kernel as a run option: `config.kernels`, `dispatch.kernels`, `attn_jax.load(kernels=)`.

Which implementation ran is read from the dispatcher (`dispatch._choose` records the name it
was given) or from the jaxpr (a Pallas kernel is a `pallas_call`).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import ops, train
from attn_jax.ops import dispatch
from attn_jax.train import config_check
from experiments.configs import mqar
from tests.train.tiny import tiny_config
from tests.utils import fresh_keys, normal

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIXERS = ("lightning", "softmax")


@pytest.fixture
def chosen(monkeypatch):
  """The `(op, implementation)` of every dispatch from now on (None: automatic)."""
  calls = []
  choose = dispatch._choose

  def record(op_name, table, order, implementation, *args, **kwargs):
    calls.append((op_name, implementation))
    return choose(op_name, table, order, implementation, *args, **kwargs)

  monkeypatch.setattr(dispatch, "_choose", record)
  return calls


def _has_pallas_call(fn, *args):
  # A new function each time: JAX caches a function's trace, made under the kernels of
  # its first call.
  return "pallas_call" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


def test_kernels_context_sets_the_default_of_the_ops(monkeypatch):
  monkeypatch.setenv("ATTN_JAX_INTERPRET", "1")
  q, k, v = (normal(key, (1, 16, 2, 16)) for key in fresh_keys(3))
  linear = lambda *a: ops.linear_attention(*a, chunk_size=16)
  xla = lambda *a: ops.linear_attention(*a, chunk_size=16, implementation="xla")
  assert not _has_pallas_call(linear, q, k, v)  # automatic on CPU: XLA
  with dispatch.kernels(linear_attention="pallas_triton"):
    assert _has_pallas_call(linear, q, k, v)
    assert not _has_pallas_call(xla, q, k, v)  # an explicit implementation wins
    with dispatch.kernels(linear_attention=None):  # nested: back to automatic
      assert not _has_pallas_call(linear, q, k, v)
    with dispatch.kernels(dot_product_attention="xla"):  # other ops keep their choice
      assert _has_pallas_call(linear, q, k, v)
      assert dispatch.current_kernel("dot_product_attention") == "xla"
  assert dispatch.current_kernel("linear_attention") is None
  with pytest.raises(ValueError, match=r"kernels.linear_attention='cudnn' is not available"
                                       r".*'pallas_triton'"):
    dispatch.kernels(linear_attention="cudnn").__enter__()
  with pytest.raises(ValueError, match="kernels.softmax: unknown op"):
    dispatch.kernels(softmax="xla").__enter__()


def test_check_config_names_a_bad_kernel_or_an_unused_mixer_option(tmp_path):
  for variant in ("softmax", "gla", "hybrid", "griffin", "based_hybrid"):
    config_check.check_config(mqar.get_config(variant))  # shipped configs pass
  bad = [
      ("kernels", "linear_attention", "cudnn",
       r"config.kernels.linear_attention='cudnn' is not available for this op; "
       r"expected None \(automatic\) or one of \['xla', "),
      ("kernels", "dot_product_attention", "flash",
       r"config.kernels.dot_product_attention='flash' is unknown; .*'cudnn'"),
      ("model.mixer_options", "all", {"chunck_size": 8},
       r"config.model.mixer_options.all.chunck_size: no mixer takes the option"),
      ("model.mixer_options", "sofmax", {"window_size": 8},
       r"config.model.mixer_options.sofmax: not a mixer name"),
      ("model.mixer_options", "softmax", {"windw_size": 8},
       r"mixer 'softmax' has no option 'windw_size' "
       r"\(config.model.mixer_options.softmax.windw_size\)"),
      ("model.mixer_options", "all", {"implementation": "xla"},
       r"mixer_options.all.implementation: the kernel is a run option.*config.kernels"),
  ]
  for path, key, value, message in bad:
    config = tiny_config(tmp_path, MIXERS)
    section = config
    for name in path.split("."):
      section = section[name]
    section[key] = value
    with pytest.raises(ValueError, match=message):
      config_check.check_config(config)


def test_kernels_from_the_command_line_reach_the_op(tmp_path):
  # pallas_triton on a CPU without interpret mode fails at the first trace, naming it:
  # the automatic choice (XLA) would have trained. A bad name fails in check_config.
  config_file = tmp_path / "config.py"
  config_file.write_text(
      "from tests.train.tiny import tiny_config\n\n\ndef get_config():\n"
      f"  return tiny_config({str(tmp_path / 'data')!r}, {MIXERS!r}, num_steps=1)\n")
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "ATTN_JAX_INTERPRET": "0"}
  for kernel, message in (("pallas_triton", "implementation='pallas_triton' runs on GPU"),
                          ("nope", "config.kernels.linear_attention='nope' is unknown")):
    run = subprocess.run(
        [sys.executable, "-m", "experiments.train", f"--config={config_file}",
         f"--workdir={tmp_path / kernel}", f"--config.kernels.linear_attention={kernel}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and message in run.stdout + run.stderr, run.stderr[-3000:]


def test_trained_with_one_kernel_resumes_and_loads_with_another(tmp_path, monkeypatch,
                                                                 chosen):
  monkeypatch.setenv("ATTN_JAX_INTERPRET", "1")
  workdir = tmp_path / "run"
  config = tiny_config(tmp_path / "data", MIXERS, num_steps=1, eval_every=1)
  config.eval.num_steps = 1
  config.kernels.linear_attention = "pallas_triton"
  train.train_and_evaluate(config, workdir)
  assert ("linear_attention", "pallas_triton") in chosen
  assert ("dot_product_attention", None) in chosen  # automatic

  # Changing the kernels is no config mismatch: the run resumes.
  del chosen[:]
  config.kernels.linear_attention = "xla"
  config.train.num_steps = 2
  assert train.train_and_evaluate(config, workdir)["step"] == 2
  assert {c for c in chosen if c[0] == "linear_attention"} == {("linear_attention", "xla")}

  # Not part of the model: with the automatic choice it loads (and evaluates) where
  # neither pallas_triton nor xla was asked for; an override takes a kernel.
  monkeypatch.delenv("ATTN_JAX_INTERPRET")
  tokens = jnp.asarray(np.arange(16).reshape(1, 16) % 64, jnp.int32)
  model = attn_jax.load(workdir)
  assert model.kernels is None and not _has_pallas_call(model, tokens)
  assert np.isfinite(train.evaluate(workdir, num_steps=1)["eval/loss"])
  monkeypatch.setenv("ATTN_JAX_INTERPRET", "1")
  pallas = attn_jax.load(workdir, kernels={"linear_attention": "pallas_triton"})
  assert _has_pallas_call(pallas, tokens)
  np.testing.assert_allclose(pallas(tokens), model(tokens), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=r"kernels.linear_attention='cudnn'"):
    attn_jax.load(workdir, kernels={"linear_attention": "cudnn"})
