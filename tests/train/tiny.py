"""Tiny configs shared by the model, sharding and training tests (d_model 32, 2 layers)."""

from attn_jax import data
from experiments.configs import common, mqar


def tiny_model(mixers=("softmax",), **overrides):
  model = common.model_config("tiny", mixers)
  model.d_model, model.num_heads, model.mlp_dim = 32, 4, 64
  model.mixer_options.all = {"chunk_size": 8}
  model.mixer_options.swa = {"window_size": 4}
  model.update(overrides)
  return model


def tiny_data(data_dir):
  """MQAR small enough to build in a second: vocab 64, 32 tokens, 4 pairs."""
  config = data.default_mqar_config()
  config.update(dict(data_dir=str(data_dir), vocab_size=64, seq_len=32, num_kv_pairs=4,
                     num_train_examples=2048, num_eval_examples=128))
  return config


def tiny_config(data_dir, mixers=("softmax",), **train):
  """The MQAR experiment config at test size: 8 steps, a checkpoint every 4."""
  config = mqar.get_config()
  config.model = tiny_model(mixers)
  config.data = tiny_data(data_dir)
  config.optimizer.warmup_steps = 2
  config.train.update(dict(num_steps=8, global_batch_size=8, log_every=1, eval_every=4))
  config.train.update(train)
  config.eval.update(dict(global_batch_size=32, num_steps=2))
  config.checkpoint.update(dict(every=4, keep=3))
  config.tensorboard = True
  return config
