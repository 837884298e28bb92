"""Works around one TensorFlow Datasets 4.9.10 defect, so building needs no extra package.

`DatasetBuilder.code_path` (used to locate a builder's download checksums) reads
`importlib_resources.abc.Traversable` for any builder defined inside a package, but TFDS
declares the `importlib_resources` backport as a dependency only for Python < 3.9; without it
`download_and_prepare` fails with `ModuleNotFoundError: No module named
'importlib_resources'`. Our builders take `LocalCodePath` first in their bases, which answers
with the file that defines the class, as TFDS itself does for a module outside a package.
(TFDS's own datasets, lm1b and the others, still take that path: where they are prepared,
install `importlib-resources` too.)
"""

from __future__ import annotations

import inspect

from etils import epath
import tensorflow_datasets as tfds


class LocalCodePath:
  """Mixin for a `tfds.core.DatasetBuilder`: `code_path` is the file defining the class."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))
