"""Which keys a query sees: causal, sliding window and segment ids, in one small object."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AttentionMask:
  """The static part of an attention mask.

  Positions are aligned at the end: query i sits at key position `i + kv_len - q_len`
  (a cache of earlier keys precedes the queries). With `d = j - (i + kv_len - q_len)`,
  key j is visible to query i when
    `d <= 0` if causal, `-left <= d` if `left` is set, `d <= right` if `right` is set,
  and, with segment ids, when both ids are equal.
  """
  q_len: int
  kv_len: int
  is_causal: bool = False
  left: int | None = None
  right: int | None = None

  @property
  def offset(self) -> int:
    return self.kv_len - self.q_len

  @property
  def effective_right(self) -> int | None:
    """The right window bound with causality folded in."""
    if self.is_causal:
      return 0 if self.right is None else min(self.right, 0)
    return self.right

  def visible(self, q_segment_ids=None, kv_segment_ids=None):
    """Boolean `[batch or 1, q_len, kv_len]` visibility."""
    q_pos = jnp.arange(self.q_len)[:, None] + self.offset
    k_pos = jnp.arange(self.kv_len)[None, :]
    d = k_pos - q_pos
    ok = jnp.ones((self.q_len, self.kv_len), dtype=bool)
    if self.effective_right is not None:
      ok &= d <= self.effective_right
    if self.left is not None:
      ok &= d >= -self.left
    ok = ok[None]
    if q_segment_ids is not None:
      ok = ok & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return ok
