"""experiments/generate.py's text output (the binary itself runs on a trained workdir in
tests/train/test_train.py)."""

from tests.experiments import run_python


def test_byte_text_is_quoted_so_that_whitespace_shows():
  code = ("import numpy as np; from attn_jax import data; from experiments import generate; "
          "print(generate._show(np.frombuffer(b'a b\\n', np.uint8), "
          "data.get_tokenizer('byte')))")
  assert run_python("-c", code) == "'a b\\n'\n"
