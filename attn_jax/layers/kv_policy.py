"""KV-cache policies for decoding: which past tokens a softmax mixer's cache keeps.

    policy = kv_policy.parse("sinks_window:sinks=4,window=60")
    caches = model.init_cache(batch, max_len, policy=policy)   # DecoderLM
    cache = mixer.init_cache(batch, max_len, policy=policy.for_layer(i))

Three policies, each a frozen (hashable) dataclass, so a policy can be a static argument of
`jax.jit`:

* `full()`: every token (today's cache, the default).
* `sinks_window(sinks, window)`: StreamingLLM (Xiao et al., 2024, "Efficient Streaming
  Language Models with Attention Sinks", arXiv:2309.17453): the first `sinks` tokens (the
  attention sinks) and the `window` most recent ones; `sinks + window` slots. Token p goes
  to slot p if p < sinks, else to slot `sinks + (p - sinks) % window`.
* `per_head(sinks, window, full_heads)`: DuoAttention (Xiao et al., 2024, "DuoAttention:
  Efficient Long-Context LLM Inference with Retrieval and Streaming Heads",
  arXiv:2410.10819): in each layer the KV heads named in `full_heads` ("retrieval heads")
  keep every token, the others ("streaming heads") keep `sinks + window`. `top_full_heads`
  picks them from per-head scores (e.g. the retrieval scores of Wu et al., 2024).

Positions: keys are cached after RoPE at their absolute positions, and stay there.
StreamingLLM instead gives the cached keys positions within the cache (sinks at
0 … sinks-1, the window after them), so that query-key distances never exceed the cache
size and a model can generate past its trained length. We do not: within the trained
length every distance a query sees is one the model was trained on, and the attention over
the kept keys is exactly the full attention restricted to them, so a policy only removes
keys (and a test can compare it with a masked dense reference). Decoding past the trained
length is not what these policies are for here.

Flag syntax (`parse`, `str(policy)` writes it back):

    full
    sinks_window:sinks=S,window=W                 S ≥ 0, W ≥ 1
    per_head:sinks=S,window=W,heads=L.H+L.H+…     L.H: KV head H of layer L (0-based);
                                                  heads= (empty) keeps no head full

Memory: `cache_memory(caches)` counts the floating-point numbers and bytes of a set of
caches (integer bookkeeping excluded); `attn_jax.models.generate.kv_cache_memory` compares
a policy's caches with the full ones of a model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("full", "sinks_window", "per_head")
SYNTAX = ("full, sinks_window:sinks=S,window=W, or per_head:sinks=S,window=W,heads=L.H+L.H "
          "(L.H: KV head H of layer L)")


def _count(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int ≥ {minimum}; got {value!r}.")
  return int(value)


@dataclasses.dataclass(frozen=True)
class LayerCachePolicy:
  """The policy of one layer, what a mixer's `init_cache(..., policy=)` takes.

  Attributes:
    kind: "full", "sinks_window" or "per_head".
    sinks, window: the tokens kept by the streaming (non-full) heads (0 for "full").
    full_heads: sorted KV-head indices that keep every token ("per_head" only).
    layer: the layer's index, for error messages (None when not known).
  """

  kind: str = "full"
  sinks: int = 0
  window: int = 0
  full_heads: tuple[int, ...] = ()
  layer: int | None = None

  @property
  def is_full(self):
    return self.kind == "full"

  def streaming(self):
    """The `sinks_window` policy of this layer's streaming heads."""
    return LayerCachePolicy("sinks_window", self.sinks, self.window, (), self.layer)

  def check_heads(self, num_kv_heads):
    """Raises a ValueError if `full_heads` names a KV head the layer does not have."""
    bad = [h for h in self.full_heads if h >= num_kv_heads]
    if bad:
      where = "" if self.layer is None else f" of layer {self.layer}"
      raise ValueError(f"the per_head cache policy keeps KV head(s) {bad}{where} full, "
                       f"but the layer has {num_kv_heads} KV heads (0 … "
                       f"{num_kv_heads - 1}); fix heads=L.H in the policy.")


FULL_LAYER = LayerCachePolicy()


@dataclasses.dataclass(frozen=True)
class CachePolicy:
  """A model's KV-cache policy; build it with `full`, `sinks_window`, `per_head` or `parse`.

  Attributes:
    kind: "full", "sinks_window" or "per_head".
    sinks, window: the tokens kept by streaming heads (0 for "full").
    full_heads: `((layer, (kv_head, …)), …)`, sorted, layers without full heads left out
      ("per_head" only); a hashable mapping from layer to the KV heads kept full.
  """

  kind: str = "full"
  sinks: int = 0
  window: int = 0
  full_heads: tuple[tuple[int, tuple[int, ...]], ...] = ()

  @property
  def is_full(self):
    return self.kind == "full"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"cache policy kind must be one of {KINDS}; got {self.kind!r}.")
    if self.kind == "full":
      if self.sinks or self.window or self.full_heads:
        raise ValueError("the full cache policy takes no sinks, window or heads.")
      return
    _count("sinks", self.sinks, 0)
    _count("window", self.window, 1)
    if self.kind == "sinks_window" and self.full_heads:
      raise ValueError("the sinks_window cache policy takes no full_heads; use per_head.")

  def for_layer(self, layer):
    """The `LayerCachePolicy` of layer `layer` (0-based)."""
    layer = _count("layer", layer, 0)
    heads = dict(self.full_heads).get(layer, ())
    return LayerCachePolicy(self.kind, self.sinks, self.window, heads, layer)

  def check_layers(self, num_layers):
    """Raises a ValueError if `full_heads` names a layer beyond `num_layers`."""
    bad = [layer for layer, _ in self.full_heads if layer >= num_layers]
    if bad:
      raise ValueError(f"the per_head cache policy keeps heads of layer(s) {bad} full, but "
                       f"the model has {num_layers} layers (0 … {num_layers - 1}); fix "
                       "heads=L.H in the policy.")

  def __str__(self):
    if self.kind == "full":
      return "full"
    text = f"{self.kind}:sinks={self.sinks},window={self.window}"
    if self.kind == "per_head":
      text += ",heads=" + "+".join(f"{layer}.{h}" for layer, heads in self.full_heads
                                   for h in heads)
    return text


def full():
  """Every token: today's cache."""
  return CachePolicy()


def sinks_window(sinks, window):
  """StreamingLLM: the first `sinks` tokens (≥ 0) and the `window` (≥ 1) most recent."""
  return CachePolicy("sinks_window", sinks, window)


def per_head(sinks, window, full_heads):
  """DuoAttention: the KV heads in `full_heads` keep every token, the rest `sinks + window`.

  Args:
    sinks, window: as `sinks_window`.
    full_heads: `{layer: [kv_head, …]}`, or a sequence over layers of KV-head lists;
      indices are 0-based. KV head h serves query heads `h · g … h · g + g - 1`,
      g = num_heads // num_kv_heads.
  """
  items = full_heads.items() if isinstance(full_heads, Mapping) else enumerate(full_heads)
  canonical = {}
  for layer, heads in items:
    layer = _count("full_heads layer", layer, 0)
    heads = {_count(f"full_heads KV head of layer {layer}", h, 0) for h in heads}
    if heads:
      canonical[layer] = tuple(sorted(heads))
  return CachePolicy("per_head", sinks, window, tuple(sorted(canonical.items())))


def resolve(policy):
  """None → `full()`; a flag string → `parse(policy)`; a `CachePolicy` → itself."""
  if policy is None:
    return full()
  if isinstance(policy, str):
    return parse(policy)
  if isinstance(policy, CachePolicy):
    return policy
  raise ValueError(f"cache_policy must be None, a flag string ({SYNTAX}) or a "
                   f"kv_policy.CachePolicy; got {policy!r}.")


def layer_policy(policy):
  """What a mixer's `init_cache(policy=)` accepts, as a `LayerCachePolicy`.

  None, `full()`, `sinks_window(…)` (the same in every layer) or a `LayerCachePolicy`. A
  `per_head` `CachePolicy` names heads per layer: give the mixer `policy.for_layer(i)`
  (`DecoderLM.init_cache` does).
  """
  if policy is None:
    return FULL_LAYER
  if isinstance(policy, LayerCachePolicy):
    return policy
  if isinstance(policy, CachePolicy):
    if policy.kind == "per_head":
      raise ValueError("a mixer takes one layer's cache policy: pass "
                       "policy.for_layer(layer_index), not the model's per_head policy.")
    return policy.for_layer(0)
  raise ValueError(f"policy must be None, a kv_policy.CachePolicy or a LayerCachePolicy; "
                   f"got {policy!r}.")


_ITEM = re.compile(r"^([a-z_]+)=(.*)$")


def parse(text, flag="--cache_policy"):
  """A `CachePolicy` from its flag string (see the module docstring for the syntax).

  Raises:
    ValueError: naming `flag`, what was wrong and the expected syntax.
  """
  def fail(what):
    raise ValueError(f"{flag}={text!r}: {what}. Expected {SYNTAX}, e.g. "
                     "sinks_window:sinks=4,window=60 or "
                     "per_head:sinks=4,window=60,heads=0.1+1.0.")

  if not isinstance(text, str):
    fail(f"expected a string, got {type(text).__name__}")
  kind, _, rest = text.strip().partition(":")
  if kind not in KINDS:
    fail(f"unknown policy {kind!r}")
  if kind == "full":
    if rest.strip():
      fail("full takes no options")
    return full()
  wanted = ("sinks", "window") + (("heads",) if kind == "per_head" else ())
  options = {}
  for item in rest.split(","):
    match = _ITEM.match(item.strip())
    if match is None:
      fail(f"{item.strip()!r} is not NAME=VALUE")
    name, value = match.groups()
    if name not in wanted:
      fail(f"{kind} takes {', '.join(wanted)}; got {name!r}")
    if name in options:
      fail(f"{name} is given twice")
    options[name] = value.strip()
  missing = [name for name in wanted if name not in options]
  if missing:
    fail(f"{kind} needs {', '.join(missing)}")
  numbers = {}
  for name, minimum in (("sinks", 0), ("window", 1)):
    value = options[name]
    if not re.fullmatch(r"\d+", value) or int(value) < minimum:
      fail(f"{name} must be an integer ≥ {minimum}; got {value!r}")
    numbers[name] = int(value)
  if kind == "sinks_window":
    return sinks_window(numbers["sinks"], numbers["window"])
  heads: dict[int, list[int]] = {}
  for item in filter(None, options["heads"].split("+")):
    if not re.fullmatch(r"\d+\.\d+", item.strip()):
      fail(f"heads item {item!r} is not LAYER.KV_HEAD (e.g. 0.1 for KV head 1 of layer 0)")
    layer, head = item.strip().split(".")
    heads.setdefault(int(layer), []).append(int(head))
  return per_head(numbers["sinks"], numbers["window"], heads)


def top_full_heads(scores, k, *, num_kv_heads=None):
  """The KV heads to keep full: those of the `k` highest-scoring (layer, query head) pairs.

  Args:
    scores: `[layers, heads]` per query head (e.g. retrieval scores), finite.
    k: how many (layer, query head) pairs to choose, 0 … layers · heads; ties go to the
      lower layer, then the lower head.
    num_kv_heads: KV heads per layer (default heads); query head h reads KV head
      `h // (heads // num_kv_heads)`, and a KV head is kept full if any of its query heads
      is chosen.

  Returns:
    `{layer: (kv_head, …)}` for `per_head(sinks, window, full_heads=…)`.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or not np.all(np.isfinite(scores)):
    raise ValueError(f"scores must be a finite [layers, heads] array; got shape "
                     f"{scores.shape}" + ("" if scores.ndim != 2 else " with non-finite "
                                          "values") + ".")
  layers, heads = scores.shape
  k = _count("k", k, 0)
  if k > layers * heads:
    raise ValueError(f"k must be ≤ layers · heads = {layers * heads}; got {k}.")
  num_kv_heads = heads if num_kv_heads is None else _count("num_kv_heads", num_kv_heads, 1)
  if heads % num_kv_heads:
    raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide the heads of scores "
                     f"({heads}).")
  group = heads // num_kv_heads
  order = np.argsort(-scores.reshape(-1), kind="stable")[:k]
  chosen: dict[int, set[int]] = {}
  for index in order:
    layer, head = divmod(int(index), heads)
    chosen.setdefault(layer, set()).add(head // group)
  return {layer: tuple(sorted(h)) for layer, h in sorted(chosen.items())}


class CacheMemory(NamedTuple):
  """Floating-point numbers and bytes held by a set of caches."""

  numbers: int
  bytes: int


def cache_memory(caches):
  """The KV memory of `caches` (any pytree of arrays or `jax.ShapeDtypeStruct`s).

  Counts every floating-point array (keys, values, latents, recurrent states, convolution
  buffers); positions and other integer bookkeeping (`slot_pos`, `pos`, `sinks`, …) are
  left out, as `Mixer.decode_state_size` does.
  """
  leaves = [x for x in jax.tree.leaves(caches) if jnp.issubdtype(x.dtype, jnp.floating)]
  return CacheMemory(sum(int(x.size) for x in leaves),
                     sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in leaves))
