"""On a small model trained on MQAR: retrieval heads matter more than random heads, and a
per-head cache that keeps them full holds the accuracy a uniform cache loses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attn_jax import models
from attn_jax.analysis import heads, importance, scores
from attn_jax.data.mqar import mqar_examples
from attn_jax.layers import kv_policy
from attn_jax.models.generate import decode_logits, kv_cache_memory
from attn_jax.train.step import token_metrics

TASK = dict(vocab_size=32, seq_len=24, num_kv_pairs=3, power_a=0.01)


def _examples(n, seed):
  return mqar_examples(n, rng=np.random.default_rng(seed), **TASK)


@pytest.fixture(scope="module")
def trained():
  """2 softmax layers of 4 heads, trained to near-perfect recall (one jitted scan)."""
  model = models.DecoderLM(vocab_size=32, d_model=32, num_layers=2, num_heads=4, mlp_dim=64,
                           mixers="softmax", rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tx = optax.adamw(3e-3, weight_decay=0.01)
  steps, batch = 400, 32
  data = {k: jnp.asarray(v).reshape(steps, batch, -1)
          for k, v in _examples(steps * batch, seed=1).items()}

  def loss(params, rows):
    sums = token_metrics(nnx.merge(graphdef, params)(rows["inputs"]), rows["targets"],
                         rows["loss_mask"])
    return sums["loss_sum"] / sums["count"]

  def step(carry, rows):
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params, rows), state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), data))(params)
  return nnx.merge(graphdef, params), [_examples(256, seed=2)]


def _retrieval(model, batch):
  sample = {k: v[:32] for k, v in batch.items()}
  sources = scores.mqar_sources(sample["inputs"], sample["targets"], sample["loss_mask"])
  return heads.head_scores(model, sample["inputs"], sources=sources)["retrieval"]


def test_retrieval_heads_matter_more_than_random_heads(trained):
  """Masking the heads whose retrieval score exceeds 0.5 against as many random heads."""
  model, batches = trained
  assert importance.evaluate_heads(model, batches)["accuracy"] > 0.97
  retrieval = _retrieval(model, batches[0])
  k = int(np.sum(retrieval > 0.5))
  assert 0 < k < retrieval.size
  ablated = importance.evaluate_heads(model, batches, off=importance.order_by(retrieval)[:k])
  random = np.mean([importance.evaluate_heads(
      model, batches, off=importance.random_order((2, 4), seed=s)[:k])["accuracy"]
                    for s in range(4)])
  assert ablated["accuracy"] < random - 0.3, (retrieval, ablated, random)


def test_per_head_cache_keeps_accuracy_a_uniform_cache_loses(trained):
  """Full caches for the retrieval heads' KV heads, 2 sinks + 2 recent tokens for the
  rest, against 2 sinks + a window of the same total memory for every head."""
  model, batches = trained
  tokens, targets, mask = (jnp.asarray(batches[0][k]) for k in
                           ("inputs", "targets", "loss_mask"))

  def accuracy(policy):
    sums = token_metrics(decode_logits(model, tokens, policy), targets, mask)
    return float(sums["correct"] / sums["count"])

  retrieval = _retrieval(model, batches[0])
  chosen = kv_policy.top_full_heads(retrieval, int(np.sum(retrieval > 0.5)))
  per_head = kv_policy.per_head(2, 2, chosen)
  memory = kv_cache_memory(model, batch_size=1, max_len=TASK["seq_len"],
                           cache_policy=per_head)["fraction_of_full"]
  uniform = kv_policy.sinks_window(2, int(round(memory * TASK["seq_len"])) - 2)
  assert memory < 0.75
  assert accuracy(per_head) >= 0.95 * accuracy(kv_policy.full())
  assert accuracy(uniform) < accuracy(per_head) - 0.1
