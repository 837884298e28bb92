"""The dispatcher: explicit names, fall-through, interpret mode, clear refusals."""

import dataclasses
import importlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from attn_jax import ops
from attn_jax.ops import dispatch
from tests.utils import fresh_keys, normal, rel_err


def _qkv(heads=2, seq=20, dim=16):
  return [normal(k, (1, seq, heads, dim)) for k in fresh_keys(3)]


def test_pallas_needs_its_platform_or_interpret(monkeypatch):
  monkeypatch.delenv("ATTN_JAX_INTERPRET", raising=False)
  q, k, v = _qkv()
  with pytest.raises(NotImplementedError, match="ATTN_JAX_INTERPRET=1"):
    ops.linear_attention(q, k, v, implementation="pallas_triton")
  with pytest.raises(NotImplementedError, match="runs on TPU"):
    ops.linear_attention(q, k, v, implementation="pallas_tpu")


@pytest.mark.parametrize("implementation", ["pallas_triton", "triton"])
def test_interpret_mode_runs_the_kernel_through_the_op(monkeypatch, implementation):
  if implementation == "triton":
    pytest.importorskip("triton")
  monkeypatch.setenv("ATTN_JAX_INTERPRET", "1")
  q, k, v = _qkv()
  decay = -jnp.linspace(0.1, 1.0, 2)
  want = ops.linear_attention(q, k, v, log_decay=decay, implementation="xla", chunk_size=16)
  got = ops.linear_attention(q, k, v, log_decay=decay, implementation=implementation,
                             chunk_size=16)
  assert rel_err(got, want) < 1e-5


def test_auto_on_cpu_is_xla_and_unsupported_kernel_calls_say_so(monkeypatch):
  monkeypatch.setenv("ATTN_JAX_INTERPRET", "1")
  q, k, v = _qkv(dim=16)
  with pytest.raises(NotImplementedError, match="chunk_size=24"):  # not a power of two
    ops.linear_attention(q, k, v, implementation="pallas_triton", chunk_size=24)
  ops.linear_attention(q, k, v, chunk_size=24)  # auto: served by XLA


def test_cudnn_is_not_available_for_linear_attention():
  q, k, v = _qkv()
  with pytest.raises(NotImplementedError, match="not available for this op"):
    ops.linear_attention(q, k, v, implementation="cudnn")


@pytest.mark.parametrize("implementation", ["pallas_triton", "triton"])
def test_attention_kernel_through_the_op_in_interpret_mode(monkeypatch, implementation):
  if implementation == "triton":
    pytest.importorskip("triton")
  monkeypatch.setenv("ATTN_JAX_INTERPRET", "1")
  q, k, v = _qkv(heads=2, seq=24, dim=16)
  seg = jnp.array([[0] * 10 + [1] * 14])
  kwargs = dict(is_causal=True, q_segment_ids=seg, kv_segment_ids=seg, logits_soft_cap=5.0)
  want = ops.dot_product_attention(q, k, v, implementation="xla", **kwargs)
  got = ops.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
  assert rel_err(got, want) < 1e-5


def test_mosaic_gpu_attention_through_the_op_in_interpret_mode(monkeypatch):
  monkeypatch.setenv("ATTN_JAX_INTERPRET", "1")
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(heads=2, seq=70, dim=64))
  want = ops.dot_product_attention(q, k, v, implementation="xla", is_causal=True)
  got = ops.dot_product_attention(q, k, v, implementation="pallas_mosaic_gpu", is_causal=True)
  assert rel_err(got, want) < 2e-2
  with pytest.raises(NotImplementedError, match="pallas_mosaic_gpu supports query/key/value"):
    ops.dot_product_attention(*_qkv(dim=64), implementation="pallas_mosaic_gpu")


def test_mosaic_gpu_linear_attention_through_the_op_in_interpret_mode(monkeypatch):
  monkeypatch.setenv("ATTN_JAX_INTERPRET", "1")
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(heads=2, seq=70, dim=64))
  decay = -jnp.linspace(0.1, 1.0, 2)
  want = ops.linear_attention(q, k, v, log_decay=decay, implementation="xla")
  got = ops.linear_attention(q, k, v, log_decay=decay, implementation="pallas_mosaic_gpu")
  assert rel_err(got, want) < 2e-2
  with pytest.raises(NotImplementedError, match="pallas_mosaic_gpu supports chunk_size=64"):
    ops.linear_attention(q, k, v, implementation="pallas_mosaic_gpu", chunk_size=32)


@pytest.mark.parametrize("op", ["attention", "linear_attention"])
def test_identical_kernel_calls_share_one_trace(monkeypatch, op):
  # A model's layers call the kernel with equal shapes and options: one traced (and so
  # one lowered) kernel serves them all, where each used to lower its own.
  monkeypatch.setenv("ATTN_JAX_INTERPRET", "1")
  q, k, v = _qkv(dim=16)
  if op == "attention":
    call = lambda x: ops.dot_product_attention(x, k, v, is_causal=True,
                                               implementation="pallas_triton")
  else:
    call = lambda x: ops.linear_attention(x, k, v, implementation="pallas_triton",
                                          chunk_size=16)
  jaxpr = jax.make_jaxpr(lambda x: call(call(x)))(q)  # unguarded: tests/conftest.py
  kernels = [e.params["jaxpr"] for e in jaxpr.eqns if e.primitive.name in ("pjit", "jit")]
  assert len(kernels) == 2 and kernels[0] is kernels[1]


@pytest.mark.parametrize("platform, attention, linear", [
    ("gpu", ("cudnn", "pallas_mosaic_gpu", "pallas_triton", "triton", "xla"),
     ("pallas_mosaic_gpu", "triton", "pallas_triton", "xla")),
    ("tpu", ("pallas_tpu", "xla"), ("pallas_tpu", "xla")),
    ("cpu", ("xla",), ("xla",)),
])
def test_automatic_order_per_platform(monkeypatch, platform, attention, linear):
  monkeypatch.setattr(dispatch, "platform", lambda: platform)
  for module, order in (("attention", attention), ("linear_attention", linear)):
    backends = importlib.import_module(f"attn_jax.ops.{module}").BACKENDS
    assert dispatch.automatic_order(backends) == order


@pytest.mark.parametrize("jax_triton_imports", [True, False])
def test_linear_attention_takes_triton_before_pallas_triton(monkeypatch,
                                                            jax_triton_imports):
  """On a GPU where Mosaic GPU does not serve (not Hopper, f32, an f16 vector gate), None takes
  "triton"; where jax_triton does not import, triton refuses and "pallas_triton" serves;
  where that refuses too, the reasons of all three name what is missing. The triton
  loader runs (its import checks); stubs stand in for the kernels."""
  pytest.importorskip("triton")
  la = importlib.import_module("attn_jax.ops.linear_attention")
  monkeypatch.delenv("ATTN_JAX_INTERPRET", raising=False)
  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
  monkeypatch.setitem(sys.modules, "jax_triton",
                      types.ModuleType("jax_triton") if jax_triton_imports else None)

  def refuse(reason):
    def load():
      raise NotImplementedError(reason)
    return load

  def stub(backend, pallas_triton_serves):
    if backend.name == "pallas_mosaic_gpu":
      return dataclasses.replace(backend, load=refuse("needs a Hopper GPU"))
    if backend.name == "pallas_triton":
      return dataclasses.replace(backend, load=(
          (lambda: lambda **kw: "pallas_triton") if pallas_triton_serves
          else refuse("the Pallas Triton lowering is gone")))
    if backend.name == "triton":
      return dataclasses.replace(backend, load=lambda: (backend.load(),
                                                        lambda **kw: "triton")[1])
    return dataclasses.replace(backend, automatic=False)  # xla: not a fallback here

  chosen = lambda serves: dispatch.dispatch(
      "linear_attention", [stub(b, serves) for b in la.BACKENDS], None)
  if jax_triton_imports:
    assert chosen(True) == "triton" and chosen(False) == "triton"
  else:
    assert chosen(True) == "pallas_triton"
    with pytest.raises(NotImplementedError,
                       match=r"(?s)Hopper.*triton: .*jax_triton.*Pallas Triton lowering"):
      chosen(False)


def test_implementations_are_the_names_of_the_tables():
  names = {name for op in dispatch.OPS for name in dispatch.kernel_names(op)}
  assert names == set(dispatch.IMPLEMENTATIONS)


def test_importing_the_ops_imports_no_kernel():
  """Only the mask value type and the non-finite helpers (`nonfinite_guard`'s, plain jnp)
  come with the ops; every backend loads on first use."""
  code = ("import sys, attn_jax.ops; "
          "print(sorted(m for m in sys.modules "
          "if m.split('.')[0] in ('pallas_kernels', 'triton')))")
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True)
  assert run.stdout.strip() == str(["pallas_kernels", "pallas_kernels.flash_attention",
                                    "pallas_kernels.flash_attention.mask",
                                    "pallas_kernels.nonfinite"])


@pytest.mark.parametrize("versions, refused", [
    ({"jax-triton": "0.3.1", "triton": "3.6.0"}, False),
    ({"jax-triton": "0.4.1", "triton": "3.6.0"}, True),
    ({"jax-triton": "0.4.1", "triton": "3.7.0"}, False),
])
def test_triton_refuses_a_jax_triton_too_new_for_its_triton(monkeypatch, versions, refused):
  """jax-triton 0.4 with Triton 3.6 imports and then fails in every call: refused up
  front, so that the automatic choice passes the call on."""
  pytest.importorskip("triton")
  monkeypatch.delenv("ATTN_JAX_INTERPRET", raising=False)
  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
  monkeypatch.setitem(sys.modules, "jax_triton", types.ModuleType("jax_triton"))
  monkeypatch.setattr(dispatch.metadata, "version", lambda name: versions[name])
  load = lambda: dispatch.import_triton_kernels("pallas_kernels.linear_attention.triton")
  if refused:
    with pytest.raises(NotImplementedError, match=r"jax-triton 0\.4\.1 needs Triton >= 3\.7"):
      load()
  else:
    assert load().__name__ == "pallas_kernels.linear_attention.triton"


def test_linear_attention_auto_order_on_a_gpu(monkeypatch):
  """On a GPU, None tries the Mosaic GPU kernels first and falls through to the
  Triton-language ones for a call they cannot serve (here float32 inputs); both run
  interpreted on this CPU."""
  pytest.importorskip("triton")
  la = importlib.import_module("attn_jax.ops.linear_attention")
  monkeypatch.setenv("ATTN_JAX_INTERPRET", "1")
  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
  tried = []

  def recording(backend):
    def load():
      tried.append(backend.name)
      return backend.load()
    return dataclasses.replace(backend, load=load)
  backends = [recording(backend) for backend in la.BACKENDS]
  q, k, v = _qkv(dim=16)
  got = dispatch.dispatch("linear_attention", backends, None, q, k, v, None,
                          jnp.zeros((1, 2, 16, 16)), jnp.zeros((1, 20), bool), scale=0.25,
                          chunk_size=16)[0]
  assert tried == ["pallas_mosaic_gpu", "triton"]
  want = ops.linear_attention(q, k, v, scale=0.25, chunk_size=16, implementation="xla")
  assert rel_err(got, want) < 1e-5
