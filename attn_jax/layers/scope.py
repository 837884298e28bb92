"""What a model's blocks tell the layers inside them: the layer index, a head mask, and
whether dropout is on.

    with head_mask(mask):                 # [layers, heads], 0/1 or soft, may be traced
      logits = model(tokens)              # each head's output is scaled by its entry

The model's blocks run each layer under `layer_scope(i)` (forward and decode). Every
multi-head mixer ends with an output projection from `[heads, head_dim]` (`Projection`
with input axes named "heads", "head_dim"); that projection multiplies head h's output
by `mask[layer, h]` before contracting (in Based, head h of both branches), as
Michel et al. (2019, "Are Sixteen Heads
Really Better than One?") mask heads. So the mask acts after any per-head norm or gate,
and `∂loss/∂mask` is the importance of that paper. Both are context variables read when
a model is traced: under jit, grad or remat the mask must be an argument of the traced
function, which enters `head_mask` inside it (a mask entered outside is refused, since a
cached trace would keep it):

    @jax.jit
    def masked_logits(graphdef, state, mask, tokens):
      with head_mask(mask):
        return nnx.merge(graphdef, state)(tokens)

Dropout (a model's `embed_dropout`, attention's `dropout` option) is on only inside
`dropout_rng(key)`, which the training step enters with a key per step; everywhere else
(evaluation, decoding, analysis) the same model applies none. Each layer draws its masks
from `dropout_key(stream)`: the key folded with the layer index and the stream.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from pallas_kernels.dropout import dropout as inverted_dropout

_LAYER = contextvars.ContextVar("attn_jax_layer", default=-1)
_HEAD_MASK = contextvars.ContextVar("attn_jax_head_mask", default=None)
_DROPOUT_RNG = contextvars.ContextVar("attn_jax_dropout_rng", default=None)


@contextlib.contextmanager
def layer_scope(index: int):
  """Names the layer of the calls made inside (set by the model's blocks)."""
  token = _LAYER.set(int(index))
  try:
    yield
  finally:
    _LAYER.reset(token)


def current_layer() -> int:
  """The index set by the innermost `layer_scope`; -1 outside any."""
  return _LAYER.get()


@contextlib.contextmanager
def head_mask(mask):
  """Scales each head's output by `mask[layer, head]` in the calls made inside.

  Args:
    mask: `[num_layers, num_heads]` (numbers, 0/1 or soft; may be a tracer). A layer
      whose mixer has no heads (BaseConv, the MLP-only identity) ignores its row.
  """
  mask = jnp.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"head_mask must be [num_layers, num_heads]; got shape {mask.shape}.")
  token = _HEAD_MASK.set(mask)
  try:
    yield
  finally:
    _HEAD_MASK.reset(token)


def mask_heads(x):
  """`x [..., heads, head_dim]` with head h scaled by the active mask's entry for the
  current layer; x unchanged without a mask or outside a layer."""
  mask, layer = _HEAD_MASK.get(), _LAYER.get()
  if mask is None or layer < 0:
    return x
  if layer >= mask.shape[0] or mask.shape[1] != x.shape[-2]:
    raise ValueError(f"head_mask of shape {mask.shape} does not fit layer {layer} with "
                     f"{x.shape[-2]} heads: give one row per layer and one column per "
                     "head (query heads).")
  if isinstance(x, jax.core.Tracer) and not isinstance(mask, jax.core.Tracer):
    # A traced function (jit, remat, scan) may be cached by its arguments alone, and a
    # mask it did not take as one would be baked in: a later mask would be ignored.
    raise ValueError("head_mask was entered outside the traced (jit, remat, grad) "
                     "function that runs the model: pass the mask to that function as an "
                     "argument and enter head_mask inside it (see attn_jax.layers.scope).")
  return x * mask[layer].astype(x.dtype)[:, None]


@contextlib.contextmanager
def dropout_rng(key):
  """Turns dropout on in the calls made inside, its masks drawn from `key` (a PRNG key;
  enter it inside the traced function, the key an argument of it, as `head_mask`)."""
  token = _DROPOUT_RNG.set(key)
  try:
    yield
  finally:
    _DROPOUT_RNG.reset(token)


def dropout_key(stream: int = 0):
  """The key of the current layer's dropout mask number `stream` (the embedding's layer is
  -1), or None outside `dropout_rng`: no dropout."""
  key = _DROPOUT_RNG.get()
  if key is None:
    return None
  return jax.random.fold_in(jax.random.fold_in(key, _LAYER.get() + 1), stream)


def dropout(x, rate: float, stream: int = 0):
  """`x` with each element zeroed with probability `rate` and the rest divided by
  1 - rate, inside `dropout_rng`; `x` itself outside it or at rate 0."""
  key = dropout_key(stream) if rate else None
  if key is None:
    return x
  return inverted_dropout(x, rate, key)
