"""Training: sharded state, jit'd steps, orbax checkpoints, metrics, and the loop.

    attn_jax.train.train_and_evaluate(config, workdir)
    model = attn_jax.load(workdir)
"""

from attn_jax.train.checkpoint import Checkpoints, CorruptCheckpoint
from attn_jax.train.config_check import ConfigMismatchError
from attn_jax.train.load import load, load_config, load_meta
from attn_jax.train.metrics import read_metrics
from attn_jax.train.trainer import NonFiniteLossError, evaluate, train_and_evaluate

__all__ = ["Checkpoints", "ConfigMismatchError", "CorruptCheckpoint", "NonFiniteLossError",
           "evaluate", "load", "load_config", "load_meta", "read_metrics", "train_and_evaluate"]
