"""Captured maps weigh the values exactly as the ops do; scores on planted heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import analysis, data, models, ops
from attn_jax.analysis import scores
from tests.utils import rel_err


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_softmax_map_weighs_the_values_as_the_op():
  q, k, v = _normal(0, (2, 9, 4, 8)), _normal(1, (2, 9, 2, 8)), _normal(2, (2, 9, 2, 8))
  ids = jnp.array([[0] * 4 + [1] * 5, [3] * 9])
  with analysis.capture_attention() as maps:
    out = ops.dot_product_attention(q, k, v, is_causal=True, local_window_size=(3, 0),
                                    q_segment_ids=ids, kv_segment_ids=ids,
                                    logits_soft_cap=5.0, implementation="xla")
  (probs,) = maps[-1]  # an op called outside a model: layer -1
  assert probs.shape == (2, 4, 9, 9)
  weighed = jnp.einsum("bhqk,bkhd->bqhd", probs, jnp.repeat(v, 2, axis=2))
  assert rel_err(weighed, out) < 1e-5
  assert not np.any(np.triu(np.asarray(probs), 1))  # causal


@pytest.mark.parametrize("form", ["fixed", "vector"])
def test_linear_map_weighs_the_values_as_the_op(form):
  q, k, v = _normal(3, (1, 10, 2, 4)), _normal(4, (1, 10, 2, 4)), _normal(5, (1, 10, 2, 3))
  decay = {"fixed": -jnp.array([0.1, 0.5]),
           "vector": -jax.nn.softplus(_normal(7, (1, 10, 2, 4)))}[form]
  ids = jnp.array([[1] * 6 + [2] * 4])
  with analysis.capture_attention() as maps:
    out = ops.linear_attention(q, k, v, log_decay=decay, segment_ids=ids, chunk_size=4,
                               implementation="xla")
  (matrix,) = maps[-1]
  assert rel_err(jnp.einsum("bhts,bshd->bthd", matrix, v), out) < 1e-5


def test_model_maps_by_layer_and_head_and_only_eagerly():
  model = models.DecoderLM(vocab_size=32, d_model=16, num_layers=2, num_heads=2, mlp_dim=16,
                           mixers="softmax", rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 32)
  with analysis.capture_attention() as maps:
    model(tokens)
  assert sorted(maps) == [0, 1] and maps[0][0].shape == (2, 2, 7, 7)
  with analysis.capture_attention(layers=[1], heads=[0]) as maps:
    model(tokens)
  assert sorted(maps) == [1] and maps[1][0].shape == (2, 1, 7, 7)
  q = _normal(8, (1, 4, 1, 8))
  with pytest.raises(ValueError, match="eagerly"):
    with analysis.capture_attention():
      jax.jit(lambda q: ops.dot_product_attention(q, q, q, implementation="xla"))(q)


def test_planted_sink_and_copy_heads_score_one():
  seq, dim = 8, 8
  sources = jnp.array([[-1, 0, 1, 0, 3, 2, 5, 4]])  # the key each query copies from
  # Head 0 looks at token 0 from everywhere (a sink); head 1 at its source (a copy head).
  q = jnp.zeros((1, seq, 2, dim)).at[0, :, 0, 0].set(10.0)
  q = q.at[0, :, 1].set(10.0 * jax.nn.one_hot(jnp.maximum(sources[0], 0), dim))
  k = jnp.zeros((1, seq, 2, dim)).at[0, 0, 0, 0].set(10.0)
  k = k.at[0, :, 1].set(10.0 * jnp.eye(seq, dim))
  with analysis.capture_attention() as maps:
    ops.dot_product_attention(q, k, k, is_causal=True, implementation="xla")
  probs = maps[-1][0]
  np.testing.assert_allclose(scores.sink_score(probs)[0], 1.0, atol=1e-6)
  # The sink head "retrieves" only where the source is token 0: 2 of the 7 events.
  np.testing.assert_allclose(scores.retrieval_score(probs, sources), [2 / 7, 1.0],
                             rtol=1e-6)
  # The copy head puts 3 of 8 queries on token 0 (query 0, two sources): 0.375.
  np.testing.assert_allclose(scores.sink_score(probs)[1], 3 / 8, rtol=1e-6)
  assert scores.sink_ratio(scores.sink_score(probs), epsilon=0.5) == 0.5


def test_induction_entropy_and_distance_on_hand_made_maps():
  period, seq = 3, 7
  induction = np.zeros((1, 1, seq, seq))
  for t in range(seq):
    induction[0, 0, t, t - period + 1 if t >= period else 0] = 1.0
  uniform = np.tril(np.ones((seq, seq))) / np.arange(1, seq + 1)[:, None]
  maps = jnp.asarray(np.concatenate([induction, uniform[None, None]], axis=1))
  np.testing.assert_allclose(scores.induction_score(maps, period)[0], 1.0)
  np.testing.assert_allclose(scores.entropy(maps),
                             [0.0, np.mean(np.log(np.arange(1, seq + 1)))], rtol=1e-6)
  expected = np.mean([np.mean(np.arange(t + 1)) for t in range(seq)])  # uniform over s ≤ t
  np.testing.assert_allclose(scores.mean_distance(maps)[1], expected, rtol=1e-6)


def test_mqar_sources_point_at_the_values():
  rows = data.mqar_examples(4, vocab_size=32, seq_len=24, num_kv_pairs=3, power_a=0.5,
                            rng=np.random.default_rng(0))
  sources = scores.mqar_sources(rows["inputs"], rows["targets"], rows["loss_mask"])
  queries = rows["loss_mask"] > 0
  assert np.all((sources >= 0) == queries)
  b, t = np.nonzero(queries)
  np.testing.assert_array_equal(rows["inputs"][b, sources[b, t]], rows["targets"][b, t])
  assert np.all(sources[b, t] < 6) and np.all(sources[b, t] % 2 == 1)  # value slots
