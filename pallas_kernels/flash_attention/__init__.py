"""Every backend of `attn_jax.ops.dot_product_attention`, one module each, all with the
entry point `flash_attention(query, key, value, *, q_segment_ids, kv_segment_ids, sinks,
mask, scale, logits_soft_cap, return_residuals, ...)`: `xla` (the reference, any
platform), `cudnn`, `pallas_mosaic_gpu` (+ `mosaic_gpu_backward`), `pallas_triton`,
`pallas_tpu`. `mask.AttentionMask` says which keys a query sees, for all of them; `common`
holds what the kernels share."""
