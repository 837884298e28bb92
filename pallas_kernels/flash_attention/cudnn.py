"""cuDNN's fused flash attention, through `jax.nn.dot_product_attention(implementation=
"cudnn")`: NVIDIA GPUs, bfloat16/float16, causal or full masks with an optional left
window. What it cannot serve raises `NotImplementedError`, and the op's dispatch moves on
to the Pallas kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.mask import AttentionMask


def flash_attention(query, key, value, *, q_segment_ids=None, kv_segment_ids=None,
                    sinks=None, mask: AttentionMask, scale: float,
                    logits_soft_cap: float | None, return_residuals: bool):
  """Softmax attention with the kernels' arguments (`pallas_triton.flash_attention`).

  Raises:
    NotImplementedError: off an NVIDIA GPU, and naming each argument cuDNN does not take
      (segment ids, sinks, soft-cap, log-sum-exp, float32, a value head_dim other than the
      query's, a right window bound, a window without causality, and a causal or windowed
      mask with q_seq != kv_seq, which cuDNN aligns at the start).
  """
  del kv_segment_ids  # given with q_segment_ids
  platform = jax.default_backend()
  platform = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
  if platform != "gpu":
    raise NotImplementedError(f"cudnn needs an NVIDIA GPU; the backend is {platform!r}.")
  causal = mask.right == 0
  unsupported = [
      ("q_segment_ids", q_segment_ids is not None),
      ("sinks", sinks is not None),
      ("logits_soft_cap", logits_soft_cap is not None),
      ("return_residuals (cuDNN returns the log-sum-exp in the input dtype)",
       return_residuals),
      ("dtype float32 (cuDNN takes bfloat16/float16)",
       query.dtype not in (jnp.bfloat16, jnp.float16)),
      ("value head_dim different from query head_dim", value.shape[-1] != query.shape[-1]),
      ("q_seq != kv_seq with a causal or windowed mask (cuDNN aligns them at the start)",
       mask.q_len != mask.kv_len and (mask.left is not None or mask.right is not None)),
      ("a right window bound > 0", not causal and mask.right is not None),
      ("a left window without a causal mask", mask.left is not None and not causal),
  ]
  for what, bad in unsupported:
    if bad:
      raise NotImplementedError(f"cudnn does not support {what}.")
  window = None if mask.left is None else (mask.left, 0)
  return jax.nn.dot_product_attention(
      query, key, value, scale=scale, is_causal=causal,
      local_window_size=window, implementation="cudnn")
