"""Zoology's model setup: no MLP (identity state mixer), LayerNorm, learned positions,
embedding and attention dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax.layers import scope
from tests.models.test_decoder import SEQ, _decode_all, forward, make, tokens
from tests.utils import rel_err

ZOOLOGY = dict(mlp_dim=0, norm="layer", positions="learned", max_len=SEQ)


def test_zoology_model_decodes_as_its_parallel_pass():
  model = make(["hyena", "softmax"], mixer_options={"hyena": {"max_len": SEQ}}, **ZOOLOGY)
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]
  assert not any("mlp'" in p and "mlp_norm" not in p for p in paths)
  assert any("position_embed" in p for p in paths) and any("'bias'" in p for p in paths)
  toks = tokens()
  parallel = forward(*nnx.split(model), toks)
  np.testing.assert_allclose(_decode_all(*nnx.split(model), toks), parallel, atol=2e-4,
                             rtol=2e-4)


def test_identity_state_mixer_adds_the_normed_stream():
  model = make(["softmax"], num_layers=1, mlp_dim=0, norm="layer")
  block = model.blocks[0]
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  after_mixer = x + block.mixer(block.mixer_norm(x))
  expected = after_mixer + block.mlp_norm(after_mixer)
  assert rel_err(block(x), expected) < 1e-6


def test_learned_positions_restart_in_each_segment():
  model = make(["softmax"], **ZOOLOGY)
  toks = tokens(batch=1)
  half = SEQ // 2
  ids = jnp.array([[0] * half + [1] * half])
  packed = forward(*nnx.split(model), toks, ids)
  second = forward(*nnx.split(model), toks[:, half:])
  assert rel_err(packed[:, half:], second) < 1e-5


@jax.jit
def _dropped(graphdef, state, toks, key):
  with scope.dropout_rng(key):
    return nnx.merge(graphdef, state)(toks)


def test_dropout_only_in_training_seeded_by_its_key():
  """Zoology's embedding (0.1) and attention (0.1) dropout: outside `dropout_rng` the model
  is the one without dropout (evaluation, decoding); inside, each key draws its masks,
  the same key the same ones, each layer its own."""
  options = {"softmax": {"dropout": 0.3, "rope": False}}
  model = make(["softmax"], embed_dropout=0.3, mixer_options=options, **ZOOLOGY)
  plain = make(["softmax"], mixer_options={"softmax": {"rope": False}}, **ZOOLOGY)
  toks = tokens()
  eval_logits = forward(*nnx.split(model), toks)
  np.testing.assert_array_equal(eval_logits, forward(*nnx.split(plain), toks))
  np.testing.assert_allclose(_decode_all(*nnx.split(model), toks), eval_logits, atol=2e-4,
                             rtol=2e-4)
  key = jax.random.key(3)
  train_logits = _dropped(*nnx.split(model), toks, key)
  np.testing.assert_array_equal(train_logits, _dropped(*nnx.split(model), toks, key))
  assert rel_err(train_logits, eval_logits) > 0.05
  assert rel_err(train_logits, _dropped(*nnx.split(model), toks, jax.random.key(4))) > 0.05
  # Attention dropout alone changes the output too, and layers draw different masks.
  attention_only = make(["softmax"], mixer_options=options, **ZOOLOGY)
  assert rel_err(_dropped(*nnx.split(attention_only), toks, key),
                 forward(*nnx.split(attention_only), toks)) > 0.05
  with scope.dropout_rng(key):
    with scope.layer_scope(0):
      first = scope.dropout_key()
    with scope.layer_scope(1):
      second = scope.dropout_key()
  assert not np.array_equal(jax.random.key_data(first), jax.random.key_data(second))
  assert scope.dropout_key() is None


def test_bad_zoology_options_are_value_errors():
  with pytest.raises(ValueError, match="positions"):
    make(["softmax"], positions="rotary")
  with pytest.raises(ValueError, match="max_len"):
    make(["softmax"], positions="learned")
  with pytest.raises(ValueError, match="mlp_dim"):
    make(["softmax"], mlp_dim=-1)
  with pytest.raises(ValueError, match="kind"):
    make(["softmax"], norm="batch")
  with pytest.raises(ValueError, match="embed_dropout"):
    make(["softmax"], embed_dropout=1.0)
  with pytest.raises(ValueError, match="dropout must be"):
    make(["softmax"], mixer_options={"softmax": {"dropout": -0.1}})
  model = make(["softmax"], **ZOOLOGY)
  with pytest.raises(ValueError, match="max_len"):
    forward(*nnx.split(model), tokens(seq=SEQ + 1))


def test_a_run_saved_before_the_zoology_fields_still_resumes():
  from attn_jax.train import config_check
  from experiments.configs import common
  current = common.base_config()
  saved = config_check.to_json(current)
  for field in ("norm", "positions", "max_len", "embed_dropout"):
    del saved["model"][field]
  assert config_check.differences(saved, current) == []
  current.model.positions = "learned"
  assert config_check.differences(saved, current) == [("model.positions", "none", "learned")]


def test_differential_attention_saved_with_per_head_lambda_still_loads_and_resumes():
  """λ became shared by a layer's heads (the paper's); runs saved before rebuild per head."""
  from attn_jax.train import config_check
  from experiments.configs import common
  current = common.base_config()
  current.model.mixers = ("diff",)
  saved = config_check.to_json(current)
  del saved["model"]["mixer_options"]["diff"]
  assert config_check.from_json(saved).model.mixer_options.diff.lambda_per_head is True
  assert config_check.differences(saved, current) == [
      ("model.mixer_options.diff.lambda_per_head", True, False)]
  # A model without differential attention resumes whatever its diff options say.
  current.model.mixers = ("softmax",)
  saved["model"]["mixers"] = ["softmax"]
  assert config_check.differences(saved, current) == []
