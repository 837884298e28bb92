"""A model from its config (`config.model` of the experiment configs)."""

from __future__ import annotations

from collections.abc import Mapping

from attn_jax.models.decoder import DecoderLM
from attn_jax.models.encoder import EncoderClassifier

KINDS = {"decoder": DecoderLM, "encoder": EncoderClassifier}


def model_kwargs(model_config) -> dict:
  """`config.model` (a ConfigDict or a dict) as plain constructor arguments."""
  config = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  config = dict(config)
  kind = config.pop("kind", "decoder")
  if kind not in KINDS:
    raise ValueError(f"config.model.kind must be one of {sorted(KINDS)}; got {kind!r}.")
  if isinstance(config.get("mixers"), (list, tuple)):
    config["mixers"] = list(config["mixers"])
  config["mixer_options"] = {k: dict(v) if isinstance(v, Mapping) else v
                             for k, v in dict(config.get("mixer_options") or {}).items()}
  return {"kind": kind, **config}


def build(model_config, *, vocab_size, rngs, num_classes=None):
  """Builds `config.model` with `vocab_size` (and `num_classes` for an encoder).

  Raises:
    ValueError: for an unknown kind or field, naming it.
  """
  kwargs = model_kwargs(model_config)
  cls = KINDS[kwargs.pop("kind")]
  if cls is EncoderClassifier and num_classes is not None:
    kwargs["num_classes"] = num_classes
  try:
    return cls(vocab_size=vocab_size, rngs=rngs, **kwargs)
  except TypeError as e:
    if "unexpected keyword argument" in str(e):
      raise ValueError(f"config.model: {e}") from None
    raise
