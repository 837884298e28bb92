"""Datasets and the input pipeline: TFDS builders that generate their data locally.

  pipeline = data.make_pipeline(config.data, split="train", global_batch_size=256, seed=0,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
  batch = pipeline.batch(step)   # this process's rows: inputs, targets, loss_mask, segment_ids

Datasets: "mqar" (Zoology's multi-query associative recall, `mqar`), "text_files" (any folder
of text, `text_files`), and any TFDS dataset with a text feature (lm1b, c4/en, …) where the
machine can download it. All are built with TFDS into array_record files and read with
`as_data_source()`, without TensorFlow. docs/data.md describes the guarantees.
"""

from attn_jax.data.configs import default_mqar_config
from attn_jax.data.configs import default_text_config
from attn_jax.data.configs import default_tfds_text_config
from attn_jax.data.mqar import Mqar
from attn_jax.data.mqar import MqarConfig
from attn_jax.data.mqar import mqar_examples
from attn_jax.data.packing import pack_documents
from attn_jax.data.pipeline import Pipeline
from attn_jax.data.pipeline import make_pipeline
from attn_jax.data.text_files import TextFiles
from attn_jax.data.text_files import TextFilesConfig
from attn_jax.data.tokenizers import get_tokenizer

__all__ = ["Mqar", "MqarConfig", "Pipeline", "TextFiles", "TextFilesConfig",
           "default_mqar_config", "default_text_config", "default_tfds_text_config",
           "get_tokenizer", "make_pipeline", "mqar_examples", "pack_documents"]
