"""attn_jax: attention mechanisms as pure functions, fast kernels, layers and models.

`attn_jax.ops` (pure JAX) is imported eagerly; the Flax-based subpackages (`layers`,
`models`, `train`, `data`, `parallel`) load on first use, so `from attn_jax import ops`
stays free of Flax.
"""

import importlib

from attn_jax import ops

_LAZY = ("data", "layers", "models", "parallel", "sharding", "train")

__all__ = ["load", "ops", *_LAZY]


def load(workdir, **kwargs):
  """Rebuilds a trained model from `workdir`; see `attn_jax.train.load.load`."""
  from attn_jax.train.load import load as _load
  return _load(workdir, **kwargs)


def __getattr__(name):
  if name in _LAZY:
    return importlib.import_module(f"attn_jax.{name}")
  raise AttributeError(f"module 'attn_jax' has no attribute {name!r}")
