"""Calling Triton-language kernels (`@triton.jit`) from JAX, on a GPU or on the CPU.

`triton_call(kernel, *args, out_shape=..., grid=...)` has the calling convention of
`jax_triton.triton_call` (jax-triton 0.3.1, `jax_triton/triton_lib.py`), so one kernel
source runs both ways:

  * the kernel's parameters are `args` in order — arrays become pointers, Python
    `bool`/`int`/`float` and `np.float32` stay scalars in place (a Python float is an fp64
    scalar, an np.float32 an fp32 one; ints are i32, u32 or i64 by value) — then one
    pointer per leaf of `out_shape`, in order, then `**metaparams` by name (the kernel
    declares them `tl.constexpr`);
  * `grid` is an int, a tuple of up to 3 ints, or a function of the metaparams dict;
  * `input_output_aliases={input index: output index}` (indices among the array
    arguments, scalars not counted) makes the output start as that input; the kernel
    still gets the output's own pointer after the inputs;
  * `zeroed_outputs` (indices, or a function of the metaparams) start as zeros; every
    other output starts undefined;
  * `num_warps` (default 4), `num_stages` (default 3) and jax-triton's other launch
    options go to the compiler; they are not kernel parameters.
  * The result has the structure of `out_shape`. There is no autodiff and no vmap rule
    (as in jax-triton): wrap calls in a `jax.custom_vjp`.

On a GPU the call goes to `jax_triton.triton_call` (imported when first needed, so
`import pallas_kernels` needs neither triton nor jax_triton). With `interpret=True`, or
`ATTN_JAX_INTERPRET=1`, the same kernel runs under Triton's own interpreter
(`triton/runtime/interpreter.py`, what `TRITON_INTERPRET=1` selects) inside a
`jax.pure_callback`, on NumPy arrays: no GPU, no torch. There, outputs that are neither
aliased nor zeroed start as NaN (integers as their minimum), so a kernel that reads an
output it never wrote shows it. The interpreter walks the grid one program at a time in
Python and runs each block operation in NumPy (about 5 ms per program and loop iteration
for attention tiles): small shapes only.

Interpreter fixes, applied only while this module interprets a kernel and only for the
Triton version they were written against (`_INTERPRETER_FIXES_FOR`):

  1. `range()` over a bound read at run time calls `int()` on a shape-(1,) NumPy array,
     an error since NumPy 2.4. Fixed upstream in Triton 3.7 (`.squeeze()` in
     `_patch_lang_tensor`): remove with the move to Triton ≥ 3.7.
  2. bf16 is held as raw uint16 bits, so arithmetic and `tl.dot` on bf16 tiles compute
     on integers, and f32 → bf16 casts truncate (the GPU rounds to nearest even). Here
     bf16 is `ml_dtypes.bfloat16` and casts go through it. Still present in Triton 3.7.0:
     remove when upstream's `_get_np_dtype` maps bf16 to a float type.

Limits of the interpreter path: the kernel must be a `triton.jit` function (not an
autotuner or heuristics wrapper), and the `@triton.jit` helpers it calls must be
module-level names (of the kernel's module, of modules they come from, or of
triton.language): those are swapped for interpreted ones during the run.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

# jax_triton.triton_call's launch options; everything else passed by keyword is a
# metaparameter (a constexpr kernel argument).
_LAUNCH_OPTIONS = ("name", "custom_call_target_name", "num_ctas", "compute_capability",
                   "enable_fp_fusion", "debug", "serialized_metadata")
# The interpreter fixes below patch private code of this Triton release (see the module
# docstring for what they fix and when to remove them).
_INTERPRETER_FIXES_FOR = "3.6.0"
# The interpreter and its patches of triton.language are process-wide.
_INTERPRETER_LOCK = threading.Lock()

_TRITON_MISSING = ("needs the `triton` package (pinned: triton==3.6.0; installed by the "
                   "`gpu` extra, `pip install -e '.[gpu]'`)")


def interpret_by_default() -> bool:
  """True when `ATTN_JAX_INTERPRET=1` (the same switch as `attn_jax.ops.dispatch`)."""
  return os.environ.get("ATTN_JAX_INTERPRET", "0").lower() in ("1", "true", "yes")


def triton_call(kernel, *args, out_shape, grid, interpret: bool | None = None,
                input_output_aliases: dict[int, int] | None = None,
                zeroed_outputs: Sequence[int] | Callable[[dict[str, Any]], Sequence[int]] = (),
                num_warps: int | None = None, num_stages: int | None = None,
                **metaparams):
  """Runs a `@triton.jit` kernel on JAX arrays: jax_triton on GPU, interpreter on CPU.

  Args:
    kernel: a `triton.jit` function.
    *args: arrays (passed as pointers) and Python bool/int/float or np.float32 scalars.
    out_shape: a `jax.ShapeDtypeStruct` (anything with `.shape` and `.dtype`) or a pytree
      of them; one pointer per leaf follows the arguments.
    grid: int, tuple of up to 3 ints, or a function of the metaparams dict.
    interpret: run under Triton's interpreter (CPU); None reads `ATTN_JAX_INTERPRET`.
    input_output_aliases: {index among the array args: output index}.
    zeroed_outputs: output indices (or a function of the metaparams giving them) zeroed
      before the launch.
    num_warps, num_stages: Triton launch settings (ignored by the interpreter).
    **metaparams: constexpr kernel arguments, and jax_triton's launch options
      (`name`, `num_ctas`, `debug`, ...; ignored by the interpreter).

  Returns:
    The outputs, in the structure of `out_shape`.

  Raises:
    ModuleNotFoundError: triton (or, compiled, jax_triton) is not installed.
    NotImplementedError: compiled on a backend other than a GPU.
  """
  if interpret is None:
    interpret = interpret_by_default()
  aliases = dict(input_output_aliases or {})
  if interpret:
    params = {k: v for k, v in metaparams.items() if k not in _LAUNCH_OPTIONS}
    return _interpret_call(kernel, args, out_shape, grid, aliases, zeroed_outputs, params)
  if jax.default_backend() not in ("gpu", "cuda", "rocm"):
    raise NotImplementedError(
        f"triton_call compiles for GPUs, but the default backend is "
        f"{jax.default_backend()!r}; pass interpret=True or set ATTN_JAX_INTERPRET=1 to "
        "run the kernel in Triton's interpreter.")
  try:
    import jax_triton  # pylint: disable=import-outside-toplevel
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        f"triton_call on a GPU needs the `jax-triton` package (pinned: jax-triton==0.3.1, "
        f"with triton==3.6.0; `pip install -e '.[gpu]'`): {e}") from e
  return jax_triton.triton_call(
      *args, kernel=kernel, out_shape=out_shape, grid=grid, num_warps=num_warps,
      num_stages=num_stages, input_output_aliases=aliases, zeroed_outputs=zeroed_outputs,
      **metaparams)


def _is_scalar(x) -> bool:
  return isinstance(x, (bool, int, float, np.float32))


def _normalize_grid(grid, metaparams) -> tuple[int, int, int]:
  if callable(grid):
    grid = grid(metaparams)
  if isinstance(grid, int):
    grid = (grid,)
  if len(grid) > 3:
    raise ValueError(f"grid={grid!r} has more than three dimensions.")
  return tuple(int(g) for g in grid) + (1,) * (3 - len(grid))


def _interpret_call(kernel, args, out_shape, grid, aliases, zeroed_outputs, metaparams):
  """`triton_call` under Triton's interpreter, in a `jax.pure_callback`."""
  _import_triton()
  leaves, out_tree = jax.tree.flatten(out_shape)
  outs = [jax.ShapeDtypeStruct(tuple(x.shape), x.dtype) for x in leaves]
  arrays = [jax.numpy.asarray(a) for a in args if not _is_scalar(a)]
  grid = _normalize_grid(grid, metaparams)
  zeroed = set(zeroed_outputs(metaparams) if callable(zeroed_outputs) else zeroed_outputs)
  for src, dst in aliases.items():
    if not 0 <= src < len(arrays) or not 0 <= dst < len(outs):
      raise ValueError(f"input_output_aliases={aliases}: {src}->{dst} is out of range for "
                       f"{len(arrays)} array arguments and {len(outs)} outputs.")
    if (arrays[src].shape, arrays[src].dtype) != (outs[dst].shape, outs[dst].dtype):
      raise ValueError(f"input_output_aliases: input {src} {arrays[src].shape} "
                       f"{arrays[src].dtype} differs from output {dst} {outs[dst].shape} "
                       f"{outs[dst].dtype}.")
  source = {dst: src for src, dst in aliases.items()}

  def run_on_host(*host_arrays):
    host_arrays = [np.ascontiguousarray(a) for a in host_arrays]
    results = []
    for i, out in enumerate(outs):
      if i in source:
        results.append(np.array(host_arrays[source[i]], copy=True))
      elif i in zeroed:
        results.append(np.zeros(out.shape, out.dtype))
      else:
        results.append(_poisoned(out.shape, out.dtype))
    inputs = iter(host_arrays)
    kernel_args = [_scalar(a) if _is_scalar(a) else _HostPointer(next(inputs)) for a in args]
    kernel_args += [_HostPointer(r) for r in results]
    _run_interpreted(kernel, grid, kernel_args, metaparams)
    return results

  results = jax.pure_callback(run_on_host, outs, *arrays)
  return jax.tree.unflatten(out_tree, results)


def _poisoned(shape, dtype):
  dtype = np.dtype(dtype)
  if np.issubdtype(dtype, np.integer):
    return np.full(shape, np.iinfo(dtype).min, dtype)
  if dtype == np.bool_:
    return np.zeros(shape, dtype)
  return np.full(shape, np.nan, dtype)


class _HostPointer:
  """What the interpreter needs of a tensor argument: its address and element type."""

  def __init__(self, array: np.ndarray):
    self.array = array  # keeps the memory alive while the kernel runs
    self.dtype = _TRITON_TYPE[np.dtype(array.dtype).name]

  def data_ptr(self) -> int:
    return self.array.ctypes.data


# As jax_triton's _JAX_TO_TRITON_TYPE_MAP, by NumPy dtype name.
_TRITON_TYPE = {
    "bfloat16": "bf16", "float64": "fp64", "float32": "fp32", "float16": "fp16",
    "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5", "float8_e4m3fnuz": "fp8e4b8",
    "float8_e5m2fnuz": "fp8e5b16", "int64": "i64", "int32": "i32", "int16": "i16",
    "int8": "i8", "uint64": "u64", "uint32": "u32", "uint16": "u16", "uint8": "u8",
    "bool": "i1",
}


def _scalar(value):
  """A scalar argument typed as jax_triton types it: a Python float is fp64 (the
  interpreter alone would leave it a weakly typed constant), np.float32 fp32; ints and
  bools the interpreter types by value as jax_triton does."""
  if isinstance(value, (bool, int)):
    return value
  import triton.language as tl  # pylint: disable=import-outside-toplevel
  from triton.runtime import interpreter  # pylint: disable=import-outside-toplevel
  dtype, np_dtype = ((tl.float32, np.float32) if isinstance(value, np.float32)
                     else (tl.float64, np.float64))
  return tl.tensor(interpreter.TensorHandle(np.array([value], np_dtype), dtype), dtype)


def _import_triton():
  try:
    import triton  # pylint: disable=import-outside-toplevel
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f"triton_call in interpret mode {_TRITON_MISSING}: {e}") from e
  if triton.__version__ != _INTERPRETER_FIXES_FOR:
    raise RuntimeError(
        f"pallas_kernels.triton_call patches Triton {_INTERPRETER_FIXES_FOR}'s interpreter "
        f"(see its module docstring), but triton {triton.__version__} is installed; check "
        "the fixes against that version's triton/runtime/interpreter.py and update "
        "_INTERPRETER_FIXES_FOR, or install triton==3.6.0.")
  return triton


def _run_interpreted(kernel, grid, kernel_args, metaparams):
  """Runs `kernel` over `grid` in Triton's interpreter on host pointers."""
  import triton  # pylint: disable=import-outside-toplevel
  from triton.runtime import interpreter  # pylint: disable=import-outside-toplevel

  if isinstance(kernel, interpreter.InterpretedFunction):  # TRITON_INTERPRET=1 was set
    fn = kernel.fn
  elif isinstance(kernel, triton.JITFunction):
    fn = kernel.fn
  else:
    raise NotImplementedError(
        f"triton_call in interpret mode runs `triton.jit` functions; got "
        f"{type(kernel).__name__} (autotuners and heuristics are compiled-only).")

  class HostGridExecutor(interpreter.GridExecutor):
    """The interpreter's launcher without its torch-only host/device copies: the
    arguments already live in host memory."""

    def _init_args_hst(self, args_dev, kwargs):
      return list(args_dev), dict(kwargs)

    def _restore_args_dev(self, args_dev, args_hst, kwargs, kwargs_hst):
      pass

  # Triton's argument typing imports gluon on first use, and gluon's import checks that
  # triton.language's functions are compiled ones: import it before they are swapped.
  import triton.experimental.gluon  # pylint: disable=import-outside-toplevel,unused-import
  interpreted = interpreter.InterpretedFunction(fn)
  with _INTERPRETER_LOCK, _interpreter_fixes(interpreter), _interpreted_helpers(fn):
    HostGridExecutor(interpreted.rewrite(), interpreted.arg_names, grid)(
        *kernel_args, **metaparams)


@contextlib.contextmanager
def _interpreted_helpers(fn):
  """Swaps every `@triton.jit` function the kernel can reach — its module's, those of the
  helpers' modules, triton.language's own (`tl.zeros`, `tl.cdiv`, ...) — for an
  interpreted one while it runs, as `TRITON_INTERPRET=1` at import time would have made
  them (a compiled `JITFunction` refuses to be called from Python)."""
  import triton  # pylint: disable=import-outside-toplevel
  from triton.runtime import interpreter  # pylint: disable=import-outside-toplevel
  pending = [fn.__globals__] + [vars(module) for name, module in list(sys.modules.items())
                                if name.startswith("triton.language") and module]
  seen, swapped = set(), []
  while pending:
    namespace = pending.pop()
    if id(namespace) in seen:
      continue
    seen.add(id(namespace))
    for name, value in list(namespace.items()):
      if isinstance(value, triton.JITFunction):
        swapped.append((namespace, name, value))
        namespace[name] = interpreter.InterpretedFunction(value.fn)
        pending.append(value.fn.__globals__)
  try:
    yield
  finally:
    for namespace, name, value in reversed(swapped):
      namespace[name] = value


@contextlib.contextmanager
def _interpreter_fixes(interpreter):
  """The two fixes of the module docstring, in place only while a kernel runs."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  import triton.language as tl  # pylint: disable=import-outside-toplevel

  bf16 = np.dtype(ml_dtypes.bfloat16)
  # pylint: disable-next=protected-access
  patch_lang, get_np_dtype = interpreter._patch_lang, interpreter._get_np_dtype
  cast_impl = interpreter.InterpreterBuilder.cast_impl

  def fixed_patch_lang(fn):
    scope = patch_lang(fn)
    # Fix 1: int() of a one-element array, as Triton 3.7 does.
    scope.set_attr(tl.core.tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    return scope

  def fixed_get_np_dtype(tt_dtype):  # Fix 2: bf16 as a float type.
    element = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
    return bf16 if element == tl.bfloat16 else get_np_dtype(tt_dtype)

  def fixed_cast_impl(self, src, dst_type):  # Fix 2: casts to and from bf16 round.
    if tl.bfloat16 in (src.dtype.scalar, dst_type.scalar):
      data = src.data.astype(fixed_get_np_dtype(dst_type.scalar))
      return interpreter.TensorHandle(data, dst_type.scalar)
    return cast_impl(self, src, dst_type)

  interpreter._patch_lang = fixed_patch_lang  # pylint: disable=protected-access
  interpreter._get_np_dtype = fixed_get_np_dtype  # pylint: disable=protected-access
  interpreter.InterpreterBuilder.cast_impl = fixed_cast_impl
  try:
    yield
  finally:
    interpreter._patch_lang = patch_lang  # pylint: disable=protected-access
    interpreter._get_np_dtype = get_np_dtype  # pylint: disable=protected-access
    interpreter.InterpreterBuilder.cast_impl = cast_impl
