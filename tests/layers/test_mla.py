"""Multi-head latent attention: the cache is the compressed latent."""

from __future__ import annotations

import pytest
from flax import nnx

from attn_jax import layers
from tests.layers import util


def test_cache_is_the_compressed_size():
  m = util.build("mla")  # kv_lora_rank 8, rope_head_dim 4, 2 heads of 8
  cache = m.init_cache(util.BATCH, 6)
  per_token = sum(v.size for k, v in cache.items() if k not in ("slot_pos", "pos"))
  per_token //= util.BATCH * 6
  assert per_token == m.kv_lora_rank + m.rope_head_dim == 12
  mha = util.build("softmax", num_kv_heads=None).init_cache(util.BATCH, 6)
  assert per_token < (mha["key"].size + mha["value"].size) // (util.BATCH * 6) == 32


def test_full_rank_query_decodes_like_the_parallel_path():
  m = util.build("mla", q_lora_rank=None)
  assert m.q_down is None
  x = util.inputs(seed=10)
  y_steps, _ = util.decode_all(m, x, m.init_cache(util.BATCH, util.SEQ))
  assert util.rel_err(y_steps, util.forward(m, x)) < 1e-5


@pytest.mark.parametrize("options, argument", [
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=-1), "q_lora_rank"),
    (dict(rope_head_dim=3), "rope_head_dim must be even"),
])
def test_bad_configuration(options, argument):
  with pytest.raises(ValueError, match=argument):
    layers.make_mixer("mla", d_model=16, num_heads=2, rngs=nnx.Rngs(0), **options)
