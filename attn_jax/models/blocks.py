"""The pieces both models stack: token embedding, SwiGLU MLP, the pre-norm block, and the
trunk `embed → blocks → final norm` that both models put their head on.

A block is `x + mixer(norm(x))` then `x + mlp(norm(x))` (pre-norm residual, as in
GPT-2/Llama), with any mixer of `attn_jax.layers.REGISTRY`. Parameters stay in
`param_dtype` (float32); activations run in the compute `dtype` (e.g. bfloat16); norms
compute in float32 (`layers.common.Norm`).
"""

from __future__ import annotations

import contextlib
import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax import layers, parallel, sharding
from attn_jax.layers.common import (Norm, Projection, check_positive_int, partitioned,
                                    segment_positions)
from attn_jax.layers.scope import dropout, layer_scope
from attn_jax.ops import dispatch

# Activation checkpointing: what the backward pass may keep instead of recomputing.
REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

RESIDUAL = ("batch", "seq", "act_embed")


def check_remat(remat):
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}; got {remat!r}.")
  return remat


POSITIONS = ("none", "learned")


class Embed(nnx.Module):
  """Token embedding `[vocab, embed]`, scaled by √d_model on the way in (so the residual
  stream starts at unit RMS) and reusable as the output projection (tied embeddings)."""

  def __init__(self, vocab_size, d_model, *, rngs, param_dtype=jnp.float32,
               names=("vocab", "embed")):
    init = nnx.initializers.normal(stddev=d_model ** -0.5)
    self.embedding = nnx.Param(partitioned(init, names)(
        rngs.params(), (vocab_size, d_model), param_dtype))
    self.scale = d_model ** 0.5

  def __call__(self, tokens, dtype):
    table = self.embedding[...]
    x = jnp.take(table, tokens, axis=0).astype(dtype) * jnp.asarray(self.scale, dtype)
    return sharding.constrain(x, RESIDUAL)

  def attend(self, x):
    """Logits `x · Eᵀ`, float32 (accumulated in float32 from `x.dtype` operands)."""
    return logits_matmul(x, self.embedding[...].astype(x.dtype))


@jax.custom_vjp
def logits_matmul(x, table):
  """`x [b, s, d] · table [v, d]ᵀ` → float32 logits `[b, s, v]`, operands in their dtype.

  Its VJP takes the float32 cotangent to the operands' dtype before the two backward
  matmuls. Plain autodiff would keep it float32 and promote the other operand, so a
  bfloat16 model ran both backward matmuls of its widest layer in float32 (TF32 GEMMs:
  14 ms of a 191 ms medium-model step on an H100, `docs/perf/training.md`).
  """
  return jnp.einsum("bsd,vd->bsv", x, table, preferred_element_type=jnp.float32)


def _logits_matmul_fwd(x, table):
  return logits_matmul(x, table), (x, table)


def _logits_matmul_bwd(residuals, d_logits):
  x, table = residuals
  d_logits = d_logits.astype(x.dtype)
  dx = jnp.einsum("bsv,vd->bsd", d_logits, table, preferred_element_type=jnp.float32)
  d_table = jnp.einsum("bsv,bsd->vd", d_logits, x, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), d_table.astype(table.dtype)


logits_matmul.defvjp(_logits_matmul_fwd, _logits_matmul_bwd)


class MLP(nnx.Module):
  """SwiGLU feed-forward (Shazeer, 2020): `down(silu(gate(x)) · up(x))`."""

  def __init__(self, d_model, hidden, *, rngs, param_dtype=jnp.float32):
    proj = dict(rngs=rngs, param_dtype=param_dtype)
    self.gate = Projection((d_model,), (hidden,), ("embed", "mlp"), **proj)
    self.up = Projection((d_model,), (hidden,), ("embed", "mlp"), **proj)
    self.down = Projection((hidden,), (d_model,), ("mlp", "embed"), **proj)

  def __call__(self, x):
    h = jax.nn.silu(self.gate(x).astype(jnp.float32)).astype(x.dtype) * self.up(x)
    h = sharding.constrain(h, ("batch", "seq", "act_mlp"))
    return self.down(h)


# What a block gives every mixer itself, never from `mixer_options`; and `implementation`,
# which is a run option (`attn_jax.ops.dispatch.kernels`, `config.kernels`), not the model's.
_NOT_OPTIONS = ("self", "d_model", "num_heads", "rngs", "causal", "dtype", "param_dtype",
                "layer_index", "num_layers", "implementation")


def _named_options(name):
  """`(names of the options mixer `name` takes, whether it also takes **options)`."""
  parameters = inspect.signature(layers.REGISTRY[name].__init__).parameters.values()
  named = {p.name for p in parameters
           if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in _NOT_OPTIONS}
  return named, any(p.kind == p.VAR_KEYWORD for p in parameters)


def check_mixer_options(mixer_options, where="mixer_options"):
  """Raises ValueError naming a key of `mixer_options` that no mixer would use.

  A section is "all" or a mixer name of `layers.REGISTRY`. A key of a mixer's section
  must be an option of that mixer (a mixer taking `**options`, e.g. "swa", checks its
  extra ones when built); a key of "all" an option of at least one mixer. Sections and
  "all" keys for mixers the model does not use are accepted, so that one config serves
  every variant (the shipped MQAR config sets `all.chunk_size` for a softmax model too).
  `implementation` is refused: the kernel is `config.kernels`, not part of the model.
  """
  for section, options in dict(mixer_options or {}).items():
    if section != "all" and section not in layers.REGISTRY:
      raise ValueError(f"{where}.{section}: not a mixer name; expected 'all' or one of "
                       f"{', '.join(layers.REGISTRY)}.")
    for key in dict(options or {}):
      if key == "implementation":
        raise ValueError(
            f"{where}.{section}.implementation: the kernel is a run option, not part of "
            "the model; set config.kernels.<op> instead (e.g. "
            "--config.kernels.linear_attention=xla).")
      if section == "all":
        if not any(key in _named_options(name)[0] for name in layers.REGISTRY):
          known = sorted(set().union(*(_named_options(n)[0] for n in layers.REGISTRY)))
          raise ValueError(f"{where}.all.{key}: no mixer takes the option {key!r}; the "
                           f"options of the mixers: {', '.join(known)}.")
        continue
      named, takes_more = _named_options(section)
      if key not in named and not takes_more:
        raise ValueError(f"mixer {section!r} has no option {key!r} ({where}.{section}."
                         f"{key}); its options: {', '.join(sorted(named))}.")


def options_for(name, common, per_mixer, *, layer_index, num_layers):
  """The options of the mixer `name` at `layer_index`.

  `per_mixer[name]` options are passed as given (a wrong one raises); `common` options
  (config `mixer_options.all`) and `layer_index`/`num_layers` (Lightning's per-layer
  decays, Differential attention's λ schedule) go to the mixers whose constructor takes
  them.
  """
  parameters = inspect.signature(layers.REGISTRY[name].__init__).parameters
  options = {k: v for k, v in dict(common).items() if k in parameters}
  options.update({"layer_index": layer_index, "num_layers": num_layers})
  options = {k: v for k, v in options.items() if k in parameters}
  options.update(dict(per_mixer.get(name, {})))
  return options


def ops_context(kernels=None):
  """What a model's ops run under: ring attention / state passing when the mesh splits
  the `seq` axis; the `kernels` (`((op, name), ...)`) that `attn_jax.load` gave it."""
  stack = contextlib.ExitStack()
  axis = sharding.sequence_axis()
  if axis:
    stack.enter_context(parallel.sequence_parallel(axis))
  if kernels:
    stack.enter_context(dispatch.kernels(**dict(kernels)))
  return stack


class Block(nnx.Module):
  """`x + mixer(norm(x))`, then `x + mlp(norm(x))`.

  `mlp_dim=0` is Zoology's identity state mixer (`state_mixer=nn.Identity`): the second
  step adds `norm(x)` itself, as Zoology's pre-norm block then does.
  """

  def __init__(self, mixer, *, d_model, num_heads, mlp_dim, rngs, causal=True, dtype=None,
               param_dtype=jnp.float32, norm_eps=1e-6, norm="rms", options=None):
    norm = dict(rngs=rngs, eps=norm_eps, kind=norm, param_dtype=param_dtype)
    self.mixer_norm = Norm((d_model,), ("embed",), **norm)
    self.mixer = layers.make_mixer(mixer, d_model=d_model, num_heads=num_heads, rngs=rngs,
                                   causal=causal, dtype=dtype, param_dtype=param_dtype,
                                   **(options or {}))
    self.mlp_norm = Norm((d_model,), ("embed",), **norm)
    if not isinstance(mlp_dim, int) or isinstance(mlp_dim, bool) or mlp_dim < 0:
      raise ValueError(f"mlp_dim must be an int ≥ 0 (0: no MLP); got {mlp_dim!r}.")
    self.mlp = MLP(d_model, mlp_dim, rngs=rngs, param_dtype=param_dtype) if mlp_dim else None

  def _state_mix(self, x):
    h = self.mlp_norm(x)
    return x + (h if self.mlp is None else self.mlp(h)).astype(x.dtype)

  def __call__(self, x, segment_ids=None):
    y = self.mixer(self.mixer_norm(x), segment_ids=segment_ids).astype(x.dtype)
    x = sharding.constrain(x + y, RESIDUAL)
    return sharding.constrain(self._state_mix(x), RESIDUAL)

  def decode(self, x_t, cache):
    y, cache = self.mixer.decode(self.mixer_norm(x_t), cache)
    return self._state_mix(x_t + y.astype(x_t.dtype)), cache


def make_blocks(mixers, *, d_model, num_heads, mlp_dim, mixer_options, causal, rngs,
                dtype, param_dtype, norm_eps, norm):
  """One `Block` per name in `mixers`, with its options from `mixer_options`
  (`{"all": {...}, name: {...}}`, see `options_for`)."""
  check_mixer_options(mixer_options)
  options = dict(mixer_options or {})
  common = dict(options.pop("all", {}))
  return nnx.List([
      Block(name, d_model=d_model, num_heads=num_heads, mlp_dim=mlp_dim, rngs=rngs,
            causal=causal, dtype=dtype, param_dtype=param_dtype, norm_eps=norm_eps,
            norm=norm, options=options_for(name, common, options, layer_index=i,
                                num_layers=len(mixers)))
      for i, name in enumerate(mixers)])


def run_blocks(blocks, x, segment_ids, remat):
  """Applies `blocks` in order, each under the activation-checkpointing `remat` policy."""
  apply = lambda block, x, ids: block(x, ids)
  if remat != "none":
    apply = nnx.remat(apply, policy=REMAT_POLICIES[remat])
  for i, block in enumerate(blocks):
    with layer_scope(i):  # names the layer (attn_jax.analysis, head masks)
      x = apply(block, x, segment_ids)
  return x


class Trunk(nnx.Module):
  """`tokens → embed → blocks → final norm`: what `DecoderLM` and `EncoderClassifier` share.

  A model subclasses it and adds its `head`. The trunk's parameters are the model's own
  attributes (`embed`, `blocks`, `final_norm`, and `position_embed` with learned
  positions), so checkpoint paths do not name the trunk. Args are those of `DecoderLM`,
  with `param_dtype` a `jnp.dtype`; `causal` is given to every mixer.
  """

  def __init__(self, *, vocab_size, d_model, num_layers, num_heads, mlp_dim, mixers, causal,
               rngs, mixer_options, dtype, param_dtype, remat, norm_eps, norm="rms",
               positions="none", max_len=0, embed_dropout=0.0):
    self.vocab_size = check_positive_int("vocab_size", vocab_size)
    if isinstance(embed_dropout, bool) or not isinstance(embed_dropout, (int, float)) or (
        not 0 <= embed_dropout < 1):
      raise ValueError(f"embed_dropout must be a number in [0, 1); got {embed_dropout!r}.")
    self.embed_dropout = float(embed_dropout)
    num_layers = check_positive_int("num_layers", num_layers)
    self.dtype = compute_dtype(dtype)
    self.remat = check_remat(remat)
    self.mixers = tuple(expand_mixers(mixers, num_layers))
    self.kernels = None  # a run option: set by `attn_jax.load(..., kernels=)`, never saved
    self.embed = Embed(vocab_size, d_model, rngs=rngs, param_dtype=param_dtype)
    if positions not in POSITIONS:
      raise ValueError(f"positions must be one of {POSITIONS}; got {positions!r}.")
    self.max_len = None
    if positions == "learned":  # GPT-2's absolute positions, scaled as the tokens
      self.max_len = check_positive_int("max_len (with positions='learned')", max_len)
      self.position_embed = Embed(max_len, d_model, rngs=rngs, param_dtype=param_dtype,
                                  names=(None, "embed"))
    self.blocks = make_blocks(self.mixers, d_model=d_model, num_heads=num_heads,
                              mlp_dim=mlp_dim, mixer_options=mixer_options, causal=causal,
                              rngs=rngs, dtype=self.dtype, param_dtype=param_dtype,
                              norm_eps=norm_eps, norm=norm)
    self.final_norm = Norm((d_model,), ("embed",), rngs=rngs, eps=norm_eps, kind=norm,
                           param_dtype=param_dtype)

  def embed_tokens(self, tokens, positions):
    """Token embeddings `[batch, seq, d_model]`, plus learned position embeddings at
    `positions` (`[batch, seq]` ints) when the model has them; then `embed_dropout` in
    training (Zoology's embedding dropout)."""
    x = self.embed(tokens, self.dtype or jnp.float32)
    if self.max_len is not None:
      if tokens.shape[1] > self.max_len:
        raise ValueError(f"{tokens.shape[1]} tokens exceed the learned positions' max_len "
                         f"({self.max_len}).")
      x = x + self.position_embed(positions, x.dtype)
    return dropout(x, self.embed_dropout)  # training only (`scope.dropout_rng`)

  def features(self, tokens, segment_ids=None):
    """`tokens [batch, seq]` int → normed features `[batch, seq, d_model]`.

    Call it under `ops_context(self.kernels)`; with segment ids no token sees another
    segment (and learned positions restart at each segment).
    """
    positions = segment_positions(segment_ids, *tokens.shape)
    x = run_blocks(self.blocks, self.embed_tokens(tokens, positions), segment_ids,
                   self.remat)
    return self.final_norm(x)


def expand_mixers(mixers, num_layers):
  """The per-layer mixer names: `mixers` (a name or a list) repeated to `num_layers`.

  `["lightning"] * 7 + ["softmax"]` with 16 layers is MiniMax-01's 7:1 hybrid twice.

  Raises:
    ValueError: for an unknown name or a pattern that does not divide `num_layers`.
  """
  pattern = [mixers] if isinstance(mixers, str) else list(mixers)
  if not pattern or num_layers % len(pattern):
    raise ValueError(f"mixers pattern {pattern} (length {len(pattern)}) must be non-empty "
                     f"and divide num_layers={num_layers}.")
  for name in pattern:
    if name not in layers.REGISTRY:
      raise ValueError(f"unknown mixer {name!r} in mixers; known: "
                       f"{', '.join(layers.REGISTRY)}.")
  return pattern * (num_layers // len(pattern))


def compute_dtype(name):
  if name in (None, "", "none"):
    return None
  try:
    return jnp.dtype(name)
  except TypeError:
    raise ValueError(f"dtype must name a float dtype (e.g. 'bfloat16'); got {name!r}.")
