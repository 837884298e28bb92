"""Head masks act as removing a head's output; importance and pruning agree with them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import analysis, layers, models
from attn_jax.analysis import importance
from attn_jax.layers.common import Projection
from tests.utils import rel_err

MULTI_HEAD = sorted(name for name, mixer in layers.REGISTRY.items()
                    if name != "base_conv" and "causal_self" in mixer.PATTERNS)


def _model(mixer, seed=0, num_layers=2):
  return models.DecoderLM(vocab_size=32, d_model=16, num_layers=num_layers, num_heads=2,
                          mlp_dim=16, mixers=mixer, rngs=nnx.Rngs(seed),
                          mixer_options={"all": {"chunk_size": 4, "max_len": 16}})


@jax.jit
def _masked_logits(graphdef, state, mask, tokens):
  with analysis.head_mask(mask):
    return nnx.merge(graphdef, state)(tokens)


def _head_projections(module):
  return [node for _, node in nnx.iter_graph(module)
          if isinstance(node, Projection) and node.from_heads]


@pytest.mark.parametrize("mixer", MULTI_HEAD)
def test_every_multi_head_mixer_ends_with_a_masked_projection(mixer):
  model = nnx.eval_shape(lambda: _model(mixer, num_layers=1))
  outs = _head_projections(model.blocks[0].mixer)
  assert len(outs) == (2 if mixer == "based" else 1)  # Based: both branches' head h
  assert all(out.kernel.shape[0] == 2 for out in outs)  # [heads, head_dim, d_model]


@pytest.mark.parametrize("mixer", ["softmax", "gla", "diff"])
def test_a_zero_entry_removes_the_head(mixer):
  """Softmax, a gated and normed linear mixer, and differential attention (two maps)."""
  model = _model(mixer)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 32)
  mask = jnp.ones((2, 2)).at[1, 0].set(0.0)
  masked = _masked_logits(*nnx.split(model), mask, tokens)
  without = nnx.clone(model)
  (out,) = _head_projections(without.blocks[1].mixer)
  out.kernel[...] = out.kernel[...].at[0].set(0.0)
  ones = jnp.ones((2, 2))
  assert rel_err(masked, _masked_logits(*nnx.split(without), ones, tokens)) < 1e-5
  assert rel_err(masked, _masked_logits(*nnx.split(model), ones, tokens)) > 1e-3  # it mattered


def test_mask_gradient_is_the_loss_derivative_and_shapes_are_checked():
  model = _model("softmax")
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, 32)

  def loss(mask):
    with analysis.head_mask(mask):
      return jnp.mean(model(tokens)[..., 3])

  loss = jax.jit(loss)
  mask = jnp.full((2, 2), 0.7)
  grad = jax.jit(jax.grad(loss))(mask)
  step = jnp.zeros((2, 2)).at[0, 1].set(1e-2)
  numeric = (loss(mask + step) - loss(mask - step)) / 2e-2
  assert abs(grad[0, 1] - numeric) < 1e-3 * max(1.0, abs(numeric))
  with pytest.raises(ValueError, match="head_mask"):
    with analysis.head_mask(jnp.ones((2, 3))):
      model(tokens)


def test_importance_and_pruning_follow_the_masked_evaluations():
  model = _model("softmax", seed=3)
  rng = np.random.default_rng(0)
  batches = [{"inputs": rng.integers(0, 32, (4, 10)), "targets": rng.integers(0, 32, (4, 10)),
              "loss_mask": (rng.random((4, 10)) < 0.5).astype(np.int32)} for _ in range(2)]
  base = importance.evaluate_heads(model, batches)
  scores = importance.head_importance(model, batches)
  assert {k: v.shape for k, v in scores.items()} == {
      "gradient": (2, 2), "loss_change": (2, 2), "accuracy_change": (2, 2)}
  off = importance.evaluate_heads(model, batches, off=[(0, 1)])
  assert np.isclose(scores["loss_change"][0, 1], off["loss"] - base["loss"])
  order = importance.order_by(scores["gradient"], descending=False)
  assert sorted(order) == sorted(importance.random_order((2, 2), seed=1))
  curve = importance.pruning_curve(model, batches, order, fractions=(0.0, 0.5, 1.0))
  assert [p["heads_off"] for p in curve] == [0, 2, 4]
  assert np.isclose(curve[0]["loss"], base["loss"])
  all_off = importance.evaluate_heads(model, batches, mask=np.zeros((2, 2)))
  assert np.isclose(curve[-1]["loss"], all_off["loss"])


def test_decode_honours_the_mask():
  from attn_jax.models.generate import decode_logits  # pylint: disable=g-import-not-at-top
  model = _model("softmax", seed=4)
  tokens = jax.random.randint(jax.random.key(5), (1, 6), 0, 32)
  mask = jnp.array([[1.0, 0.0], [0.5, 1.0]])

  @jax.jit
  def both(graphdef, state, mask):
    model = nnx.merge(graphdef, state)
    with analysis.head_mask(mask):
      return model(tokens), decode_logits(model, tokens)

  parallel, decoded = both(*nnx.split(model), mask)
  assert rel_err(decoded, parallel) < 1e-5
  assert rel_err(parallel, _masked_logits(*nnx.split(model), jnp.ones((2, 2)), tokens)) > 1e-3


def test_a_mask_entered_outside_a_traced_function_is_refused():
  """A jitted function cached by its arguments would keep the first mask it saw."""
  model = _model("softmax")
  tokens = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="argument"):
    with analysis.head_mask(jnp.ones((2, 2))):
      jax.jit(lambda t: model(t))(tokens)
