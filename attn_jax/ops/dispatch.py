"""Choosing an implementation for an op: platform, interpret mode, fall-through.

Every op keeps one ordered table of its backends (`Backend`: a name, the platform it runs
on, and a loader that imports its kernel), as tokamax's `api.py` does: `BACKENDS` in
`attention.py` and `linear_attention.py`. A backend either computes the op or raises
`NotImplementedError` naming what rules it out (an argument, a shape, the platform).
`implementation=None` tries the backends of this platform in table order, fastest first,
then those that run anywhere, and takes the first that serves the call; an explicit name
runs that backend alone, so its `NotImplementedError` reaches the user.

Which kernel runs an op is a run option, not part of a model: `with kernels(
linear_attention="xla"):` sets the implementation that calls with `implementation=None`
use (an explicit argument still wins). It is read when JAX traces, so a jit-compiled
function keeps the kernels it was traced with: the trainer enters it around its steps
(`config.kernels`), `attn_jax.load(workdir, kernels=...)` around the loaded model's calls.

A hook (`add_hook`) may take a call over before an implementation is chosen: sequence
parallelism (`attn_jax.parallel`) wraps the ops in a `shard_map` this way, below every
layer, without the ops knowing of it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
from importlib import metadata
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

IMPLEMENTATIONS = ("xla", "cudnn", "pallas_mosaic_gpu", "triton", "pallas_triton",
                   "pallas_tpu")

# The ops whose kernel a run may choose (`config.kernels.<op>`).
OPS = ("dot_product_attention", "linear_attention")


@dataclasses.dataclass(frozen=True)
class Backend:
  """One implementation of an op: a row of the op's ordered table.

  Attributes:
    name: what `implementation=` and `config.kernels.<op>` call it.
    platform: where it runs natively: "any", "gpu" or "tpu".
    load: returns the function that computes the op from the op's dispatch arguments
      (with `interpret=` added where it is interpretable), importing its kernel module only
      then, so that importing `attn_jax.ops` stays cheap.
    automatic: whether `implementation=None` may choose it.
    interpretable: for a "gpu" or "tpu" backend: a Pallas or Triton kernel, which runs
      off its platform in interpret mode (`ATTN_JAX_INTERPRET=1`); False (cuDNN): it
      checks the platform itself and takes no `interpret=`.
  """
  name: str
  platform: str
  load: Callable[[], Callable[..., Any]]
  automatic: bool = True
  interpretable: bool = True


def interpret_mode() -> bool:
  """True when `ATTN_JAX_INTERPRET=1`: every Pallas kernel runs in interpret mode."""
  return os.environ.get("ATTN_JAX_INTERPRET", "0").lower() in ("1", "true", "yes")


def platform() -> str:
  """The default backend's platform: 'cpu', 'gpu' or 'tpu'."""
  name = jax.default_backend()
  return "gpu" if name in ("gpu", "cuda", "rocm") else name


def is_hopper() -> bool:
  """True on an NVIDIA GPU of compute capability 9.x (H100, H200)."""
  if platform() != "gpu":
    return False
  capability = getattr(jax.devices()[0], "compute_capability", "")
  return str(capability).startswith("9")


def automatic_order(backends: Sequence[Backend]) -> tuple[str, ...]:
  """The names `implementation=None` tries here: this platform's, then those of "any"."""
  here = [b.name for b in backends if b.automatic and b.platform == platform()]
  return tuple(here + [b.name for b in backends if b.automatic and b.platform == "any"])


def import_triton_kernels(module: str, user: str = "implementation='triton'"):
  """Imports `module`, Triton-language kernels through jax_triton (optional dependencies):
  a missing triton, or (compiled, not interpreted) a jax_triton that does not import,
  refuses the call, so that `implementation=None` goes on to the next backend. `user`:
  what needs them, for the message.

  Raises:
    NotImplementedError: naming the missing package and how to install it.
  """
  install = "pip install -e '.[gpu]' (triton==3.6.0, jax-triton==0.3.1)"
  try:
    kernels_module = importlib.import_module(module)
  except ImportError as e:
    raise NotImplementedError(
        f"{user} needs the package {e.name or 'triton'!r} ({e}): {install}.") from e
  if not interpret_mode():
    try:
      import jax_triton  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
    except ImportError as e:
      raise NotImplementedError(
          f"{user} compiles through jax_triton, which does not import here ({e}): "
          f"{install}.") from e
    _check_jax_triton_matches_triton(install, user)
  return kernels_module


def _major_minor(version: str) -> tuple[int, int]:
  numbers = [int(n) for n in re.findall(r"\d+", version)[:2]]
  return tuple(numbers + [0] * (2 - len(numbers)))


def _check_jax_triton_matches_triton(install: str, user: str):
  """jax-triton ≥ 0.4 needs Triton ≥ 3.7: with Triton 3.6 it imports and then fails in
  every call (`'_Stub' object has no attribute 'backend'` in `triton.compiler`), which
  would break the automatic choice instead of passing the call on."""
  try:
    jax_triton_version, triton_version = (metadata.version(name)
                                          for name in ("jax-triton", "triton"))
  except metadata.PackageNotFoundError:  # not installed as distributions: nothing to check
    return
  if _major_minor(jax_triton_version) >= (0, 4) and _major_minor(triton_version) < (3, 7):
    raise NotImplementedError(
        f"{user}: jax-triton {jax_triton_version} needs Triton >= 3.7, "
        f"and Triton {triton_version} is installed: {install}.")


def require_platform(backend: Backend) -> bool:
  """Checks that an interpretable `backend` can run here; returns whether to interpret.

  Raises:
    NotImplementedError: the platform cannot run the backend and interpret mode is off.
  """
  if interpret_mode():
    return True
  name, native = backend.name, backend.platform
  if platform() != native:
    raise NotImplementedError(
        f"implementation={name!r} runs on {native.upper()}, but the default backend is "
        f"{platform()!r}; set ATTN_JAX_INTERPRET=1 to run it in Pallas interpret mode.")
  if name == "pallas_mosaic_gpu" and not is_hopper():
    raise NotImplementedError(
        f"implementation={name!r} needs a Hopper GPU (compute capability 9.x); "
        f"found {jax.devices()[0].device_kind!r}. Use 'pallas_triton'.")
  return False


@functools.cache
def traced_once(kernel: Callable[..., Any], static_argnames: tuple[str, ...]):
  """`jax.jit(kernel, static_argnames=...)`, one per kernel entry point.

  Identical calls (a model's layers) then share one trace and one lowering. Lowering a
  Pallas kernel is Python work of seconds for the Mosaic GPU attention (≈ 3.5 s forward
  and backward, per call); unrolled over the 24 layers of a model, each layer paid it
  again: 192 s of compilation against 20 s with cuDNN (`docs/perf/training.md`).
  """
  return jax.jit(kernel, static_argnames=static_argnames)


def kernel_names(op_name: str) -> tuple[str, ...]:
  """The implementation names `op_name` accepts (the names of its table)."""
  # pylint: disable=g-import-not-at-top  (the op modules import this one)
  from attn_jax.ops.attention import BACKENDS as attention_backends
  from attn_jax.ops.linear_attention import BACKENDS as linear_backends
  tables = {"dot_product_attention": attention_backends, "linear_attention": linear_backends}
  if op_name not in tables:
    raise ValueError(f"unknown op {op_name!r}; the ops with a kernel choice: {list(OPS)}.")
  return tuple(backend.name for backend in tables[op_name])


def check_kernels(choices: Mapping[str, str | None], where: str = "kernels") -> dict:
  """`choices` ({op: name or None}) as a dict, checked against each op's table.

  Raises:
    ValueError: naming the key (`where.<op>`) and the names it accepts.
  """
  choices = dict(choices or {})
  for op_name, name in choices.items():
    if op_name not in OPS:
      raise ValueError(f"{where}.{op_name}: unknown op; the ops with a kernel choice are "
                       f"{list(OPS)}.")
    if name is None:
      continue
    accepted = kernel_names(op_name)
    if name not in accepted:
      what = ("is not available for this op" if name in IMPLEMENTATIONS else "is unknown")
      raise ValueError(f"{where}.{op_name}={name!r} {what}; expected None (automatic) or "
                       f"one of {list(accepted)}.")
  return choices


_KERNELS: contextvars.ContextVar[Mapping[str, str | None]] = contextvars.ContextVar(
    "attn_jax_kernels", default={})


@contextlib.contextmanager
def kernels(**choices: str | None):
  """Within the context, ops called with `implementation=None` run `choices[op]`.

  Args:
    **choices: op name (`OPS`) -> an implementation name of its table, or None for the
      automatic choice. Ops not named keep the enclosing context's choice.

  Raises:
    ValueError: for an unknown op or implementation name.
  """
  token = _KERNELS.set({**_KERNELS.get(), **check_kernels(choices)})
  try:
    yield
  finally:
    _KERNELS.reset(token)


def current_kernel(op_name: str) -> str | None:
  """The implementation `kernels(...)` chose for `op_name` here; None: automatic."""
  return _KERNELS.get().get(op_name)


# hook(op_name, run, implementation, *args, **kwargs) -> the op's result, or
# NotImplemented to pass. `run(*args, **kwargs)` is the dispatch the hook would replace.
_HOOKS: list[Callable[..., Any]] = []


def add_hook(hook: Callable[..., Any]) -> None:
  """Lets `hook` see every op call first (idempotent); see `_HOOKS` for its signature."""
  if hook not in _HOOKS:
    _HOOKS.append(hook)


def dispatch(op_name: str, backends: Sequence[Backend], implementation: str | None, *args,
             **kwargs):
  """Runs backend `implementation`, or the first of `automatic_order` that serves the call.

  Args:
    op_name: the op's name, for messages.
    backends: the op's table, fastest first.
    implementation: None (the `kernels(...)` choice, else automatic), or one of the
      names of `backends`.
    *args, **kwargs: what each backend's function takes (`Backend.load`).
  """
  if implementation is None:
    implementation = current_kernel(op_name)
  table = {backend.name: backend for backend in backends}
  run = functools.partial(_choose, op_name, table, automatic_order(backends),
                          implementation)
  for hook in _HOOKS:
    result = hook(op_name, run, implementation, *args, **kwargs)
    if result is not NotImplemented:
      return result
  return run(*args, **kwargs)


def _choose(op_name, table, order, implementation, *args, **kwargs):
  if implementation is not None:
    if implementation not in table:
      known = sorted(table)
      if implementation in IMPLEMENTATIONS:
        raise NotImplementedError(
            f"{op_name}: implementation={implementation!r} is not available for this op; "
            f"available: {known}.")
      raise ValueError(
          f"{op_name}: implementation={implementation!r} is unknown; expected None or one "
          f"of {known}.")
    return _run(table[implementation], *args, **kwargs)
  reasons = []
  for name in order:
    try:
      return _run(table[name], *args, **kwargs)
    except NotImplementedError as e:
      reasons.append(f"{name}: {e}")
  raise NotImplementedError(f"{op_name}: no implementation serves this call:\n  "
                            + "\n  ".join(reasons))


def _run(backend, *args, **kwargs):
  if backend.interpretable and backend.platform != "any":
    kwargs["interpret"] = require_platform(backend)
  return backend.load()(*args, **kwargs)
