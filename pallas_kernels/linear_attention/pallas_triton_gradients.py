"""The backward's per-chunk kernels of `pallas_triton` (Pallas, Triton lowering): dq, dk,
dv and the decay gradient, from the chunk states h_n and dh_n that the state passes give.
Notation and precision as `pallas_triton`'s module docstring.

  1. `_gradient_kernel`: one program per (batch, head, chunk, value block) gives dq, dk,
     dv of the chunk from h_n and dh_n, and the parts of the decay gradient (all but dv
     summed over the value blocks, by default one). Vector-gate chunks too strongly
     decayed to factor are left to a later launch of it (stage "exact").
  2. `_decay_gradient_kernel`: one program per (batch, chunk, head) sums those parts
     within the chunk into dL/dg.

Decay gradient: each pair (query i, key j < i; the initial state is a key before the
sequence, the final state a query after it) carries e^{B_i − B_j}, B the cumulative log
decay of the sequence, so its share P_ij of the loss moves dL/dg_t for every j < t ≤ i
in their run; a reset token's own decay multiplies a zeroed state and gets 0. The
gradient kernel gives per token q ⊙ dq − k ⊙ dk over the pairs inside the chunk and with
the state entering it, and k ⊙ dk over the pairs with the state leaving it, both without
the pair (i, i), which cancels exactly, and per chunk Σ_v dh_n ⊙ h_n;
`_decay_gradient_kernel` sums the first two inside each chunk and adds the pairs that
span the whole chunk, e^{b_C} times the third. No sum runs past a chunk,
so rounding does not grow with the sequence: the textbook q ⊙ dq − k ⊙ dk summed over
the whole sequence lost 2e-3 of a fixed-decay gradient at −2.3 per token and T = 77;
this form loses 5e-5.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.linear_attention.chunked_plan import storage_dtype
from pallas_kernels.linear_attention.pallas_triton_tiles import (chunk_rows_spec, dot,
                                                                 earlier, factored, gate,
                                                                 iota, pairs, pallas_call,
                                                                 scalar_scores,
                                                                 vector_diag)


def _later(b, r, q_all, b_all, end):
  """Vector gate, a row block's keys against the chunk's queries after it (rows ≥ end),
  through r = b at the block's last row: the key factor e^{r − b_j} `[s, K]` and the
  queries q_i e^{b_i − r} `[C, K]` (zero for i < end)."""
  later = iota((q_all.shape[0], 1), 0) >= end
  return jnp.exp(r - b), q_all * jnp.exp(jnp.where(later, b_all - r, -jnp.inf))


def _gradient_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, rel_ref, h_ref, dh_ref, *refs,
                     scale, sub, stage):
  """dq, dk, dv and the decay-gradient parts for one chunk (all but dv: this value head's
  share): in one piece for a scalar gate and a factored vector-gate chunk, in row blocks
  of `sub` for a vector-gate chunk whose decay is too strong to factor.

  `stage` (refs: the outputs, after any aliased inputs):
    "all"      scalar gate: dq, dk, dv, db, dkeys, through.
    "queries"  vector gate, factored chunks: dq, and q ⊙ dq into db.
    "keys"     vector gate, factored chunks: dk, dv, db (−k ⊙ dk added to the aliased
               input db), dkeys, through. Split from "queries", each program holds
               fewer `[C, K]` f32 tiles.
    "exact"    vector gate, the chunks left unfactored: dq, dk, dv, db, dkeys over the
               first launches' outputs, aliased. Compiled into them, its code made the
               backward 1.37x slower at seq 1k on an H100 even where no chunk took it.

  h_n is the state entering the chunk, dh_n the gradient w.r.t. the state leaving it.
  Each pair (query i, key j < i) adds its share P_ij to dL/dB_i and takes it from
  dL/dB_j. db = q ⊙ dq − k ⊙ dk gets the pairs inside the chunk and those with the
  state entering it; dkeys = k ⊙ dk gets those with the state leaving it; through =
  Σ_v dh_n ⊙ h_n `[K]` those of later queries with keys before the chunk. The pair
  (i, i) is left out: it cancels exactly, and under strong decay it would dominate the
  sums and leave only rounding noise.
  """
  db_in_ref = through_ref = None
  if stage == "all":
    dq_ref, dk_ref, dv_ref, db_ref, dkeys_ref, through_ref = refs
  elif stage == "queries":
    dq_ref, db_ref = refs
  elif stage == "keys":
    db_in_ref, dk_ref, dv_ref, db_ref, dkeys_ref, through_ref = refs
  else:
    dq_ref, dk_ref, dv_ref, db_ref, dkeys_ref = refs[5:]  # refs[:5]: the same, aliased
  queries, keys = stage != "keys", stage != "queries"
  chunk = q_ref.shape[0]
  vector = len(b_ref.shape) == 2
  b_last = gate(b_ref, pl.ds(chunk - 1, 1)).reshape(1, -1)

  def rows_gradients(start, size, form, h, dh):  # form: "scalar", "factored" or "exact"
    rows = pl.ds(start, size)
    q, k, v, do = (ref[rows, :] for ref in (q_ref, k_ref, v_ref, do_ref))
    b, rel = gate(b_ref, rows), rel_ref[rows]
    dtype = q.dtype
    # Inter-chunk: o_i ∋ scale (q_i e^{b_i})ᵀ h_n and h_{n+1} ∋ (k_j e^{b_C − b_j}) v_jᵀ.
    if queries:
      q_decay = jnp.where(rel[:, None] == 0, jnp.exp(b), 0.0)
      dq = scale * q_decay * dot(do, h, "nt", dtype)
    if keys:
      k_decay = jnp.where(rel[:, None] == rel_ref[chunk - 1], jnp.exp(b_last - b), 0.0)
      dk_state = k_decay * dot(v, dh, "nt", dtype)
      dv = dot(k * k_decay, dh, "nn", dtype)
    # Intra-chunk, the rows' own block: o_i ∋ scale Σ_j scores_ij v_j (pairs j < i here).
    d_scores = scale * dot(do, v, "nt", dtype)
    if form == "scalar":
      scores, decay = scalar_scores(q, b, rel, k, b_ref[...])
      d_scores = jnp.where(pairs(rel, strict=True), d_scores * decay, 0.0)
      dq += dot(d_scores, k, "nn", dtype)
      dk = dot(d_scores, q, "tn", dtype)
    elif form == "factored":
      # The dot operands in the input dtype at once: fewer [C, K] f32 tiles held.
      q_decayed, k_grown = ((x * jnp.exp(y)).astype(dtype) for x, y in ((q, b), (k, -b)))
      d_scores = jnp.where(pairs(rel, strict=True), d_scores, 0.0)
      if queries:
        dq += jnp.exp(b) * dot(d_scores, k_grown, "nn", dtype)
      if keys:
        scores = jnp.where(pairs(rel), dot(q_decayed, k_grown, "nt", dtype), 0.0)
        dk = jnp.exp(-b) * dot(d_scores, q_decayed, "tn", dtype)
    else:
      scores, dq_diag, dk = vector_diag(q, b, rel, k_ref, b_ref, start, d_scores)
      dq += dq_diag
    if keys:
      dv += dot(scale * scores, do, "tn", dtype)
    if form == "exact" and start > 0:  # the rows' queries against the earlier keys
      r = b_ref[pl.ds(start - 1, 1), :]
      q_factor, k_r = earlier(b, r, k_ref[...], b_ref[...], start)
      d_scores = scale * dot(do, v_ref[...], "nt", dtype)
      d_scores = jnp.where(rel[:, None] == rel_ref[...][None, :], d_scores, 0.0)
      dq += q_factor * dot(d_scores, k_r, "nn", dtype)
    if form == "exact" and start + size < chunk:  # the rows' keys against later queries
      r = b_ref[pl.ds(start + size - 1, 1), :]
      k_factor, q_r = _later(b, r, q_ref[...], b_ref[...], start + size)
      same_run = rel_ref[...][:, None] == rel[None, :]  # [C, s]
      scores = jnp.where(same_run, scale * dot(q_r, k * k_factor, "nt", dtype), 0.0)
      d_scores = jnp.where(same_run, scale * dot(do_ref[...], v, "nt", dtype), 0.0)
      dv += dot(scores, do_ref[...], "tn", dtype)
      dk += k_factor * dot(d_scores, q_r, "tn", dtype)
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    per_token = (lambda x: x) if vector else (lambda x: jnp.sum(x, axis=1))
    own = scale * jnp.sum(do.astype(jnp.float32) * v.astype(jnp.float32), axis=1,
                          keepdims=True)
    if queries:
      dq_ref[rows, :] = (dq + own * k).astype(dq_ref.dtype)
    q_part = q * dq if queries else db_in_ref[rows]  # "keys": the "queries" launch's
    if not keys:
      db_ref[rows] = q_part
      return
    db_ref[rows] = per_token(q_part - k * dk)
    dkeys_ref[rows] = per_token(k * dk_state)
    dk_ref[rows, :] = (dk + dk_state + own * q).astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)

  if stage == "exact":
    @pl.when(jnp.logical_not(factored(b_last)))
    def _exact_chunk():
      h, dh = h_ref[...], dh_ref[...]
      for start in range(0, chunk, sub):
        rows_gradients(start, sub, "exact", h, dh)
    return
  h, dh = h_ref[...], dh_ref[...]
  if through_ref is not None:
    through_ref[...] = jnp.sum(dh.astype(jnp.float32) * h.astype(jnp.float32), axis=1)
  if vector:
    pl.when(factored(b_last))(lambda: rows_gradients(0, chunk, "factored", h, dh))
  else:
    rows_gradients(0, chunk, "scalar", h, dh)


def _decay_gradient_kernel(db_ref, dkeys_ref, through_ref, b_ref, rel_ref, reset_ref,
                           dg_ref):
  """dL/dg_t over one chunk from the gradient kernel's parts (see `_log_decay_gradient`):

    inner_t = Σ_{u ≥ t in t's run} db_u                        (0 at a reset token)
    outer_t = Σ_{u < t} dkeys_u (u in the last run) + e^{b_C} through   (t in the last
              run, not a reset token; the second term only if the chunk has no reset)

  With forward prefix sums S = cumsum(db): inner_t = E_t − S_t + db_t, E_t the sum up to
  the end of t's run — the chunk's total when it has no reset, else a masked sum over
  the runs up to t's (a `[C, C]` matmul for a vector gate, f32 IEEE).
  """
  db, rel, reset = db_ref[...], rel_ref[...], reset_ref[...] != 0
  vector = db.ndim == 2
  chunk = db.shape[0]
  rows = (lambda x: x[:, None]) if vector else (lambda x: x)
  rel_last = rel_ref[chunk - 1]
  last_run = rows(rel == rel_last)
  prefix = jnp.cumsum(db, axis=0)
  keys = jnp.where(last_run, dkeys_ref[...], 0.0)
  through = through_ref[...]
  through = through[None, :] if vector else jnp.sum(through)
  b_last = gate(b_ref, pl.ds(chunk - 1, 1)).reshape(1, -1) if vector else b_ref[chunk - 1]
  through = jnp.where(rel_last == 0, jnp.exp(b_last) * through, 0.0)
  outer = jnp.where(last_run & ~rows(reset), jnp.cumsum(keys, axis=0) - keys + through, 0.0)

  def write(run_end):
    dg_ref[...] = jnp.where(rows(reset), 0.0, run_end - prefix + db) + outer

  pl.when(rel_last == 0)(lambda: write(jnp.sum(db, axis=0, keepdims=vector)))

  @pl.when(rel_last != 0)
  def _runs():
    up_to_run = rel[None, :] <= rel[:, None]  # [t, u]: u in t's run or an earlier one
    if vector:
      write(dot(up_to_run.astype(jnp.float32), db, "nn", jnp.float32))
    else:
      write(jnp.sum(jnp.where(up_to_run, db[None, :], 0.0), axis=1))


def _chunk_specs(q, v, b, chunk, width):
  """BlockSpecs over a (batch, head, chunk, value block) grid: whole-chunk q/k (by key
  head), v-like arrays and states `width` columns wide, b and rel."""
  ratio = v.shape[2] // q.shape[2]
  key_dim = q.shape[-1]
  qk = pl.BlockSpec((None, chunk, None, key_dim), lambda n, h, t, j: (n, t, h // ratio, 0))
  vv = pl.BlockSpec((None, chunk, None, width), lambda n, h, t, j: (n, t, h, j))
  if b.ndim == 4:
    bb = pl.BlockSpec((None, chunk, None, key_dim), lambda n, h, t, j: (n, t, h, 0))
  else:
    bb = pl.BlockSpec((None, chunk, None), lambda n, h, t, j: (n, t, h))
  rel = pl.BlockSpec((None, chunk), lambda n, h, t, j: (n, t))
  state = pl.BlockSpec((None, None, None, key_dim, width), lambda n, h, t, j: (n, h, t, 0, j))
  return qk, vv, bb, rel, state


def gradient_call(q, k, v, do, b, rel, states, d_states, plan):
  """Launches `_gradient_kernel` over (batch, head, chunk, value block).

  Returns dq, dk per value head `[B, T, H, K]`, dv, and the decay-gradient parts (d_b,
  d_keys like b, through `[B, H, N, K]`); all but dv are partial sums over one value
  block, summed here when there are several.
  """
  batch, _, heads, value_dim = v.shape
  key_dim, chunk, bv = k.shape[-1], plan.chunk, plan.gradient_block_v
  splits = value_dim // bv
  qk, vv, bb, rr, state = _chunk_specs(q, v, b, chunk, bv)
  partial = lambda shape, dtype: jax.ShapeDtypeStruct((splits,) + shape, dtype)
  # dq, dk per value head; f32 when summed over value blocks or over a group of value
  # heads that share a key head.
  sums = splits > 1 or heads != q.shape[2]
  per_head = partial(k.shape[:2] + (heads, key_dim),
                     jnp.float32 if sums else storage_dtype(q.dtype))
  dqk_spec = pl.BlockSpec((None, None, chunk, None, key_dim),
                          lambda n, h, t, j: (j, n, t, h, 0))
  if b.ndim == 4:
    db_spec = dqk_spec
  else:
    db_spec = pl.BlockSpec((None, None, chunk, None), lambda n, h, t, j: (j, n, t, h))
  through_spec = pl.BlockSpec((None, None, None, None, key_dim),
                              lambda n, h, t, j: (j, n, h, t, 0))
  in_specs = [qk, qk, vv, vv, bb, rr, state, state]
  db_shape = partial(b.shape, jnp.float32)
  out_specs = [dqk_spec, dqk_spec, vv, db_spec, db_spec]  # dq, dk, dv, d_b, d_keys
  out_shape = [per_head, per_head, jax.ShapeDtypeStruct(v.shape, v.dtype), db_shape,
               db_shape]
  launch = lambda stage, **kwargs: pallas_call(
      plan, functools.partial(_gradient_kernel, scale=plan.scale, sub=plan.sub,
                              stage=stage),
      "linear_attention_gradients_" + stage,
      num_warps=plan.gradient_num_warps, num_stages=plan.gradient_num_stages,
      grid=(batch, heads, plan.chunks, splits),
      **kwargs)
  inputs = (q, k, v, do, b, rel, states, d_states)
  through_shape = partial((batch, heads, plan.chunks, key_dim), jnp.float32)
  if b.ndim == 3:
    *grads, through = launch("all", in_specs=in_specs, out_specs=out_specs + [through_spec],
                             out_shape=out_shape + [through_shape])(*inputs)
  else:  # vector gate: factored chunks in two launches, then the chunks left unfactored
    dq, d_b = launch("queries", in_specs=in_specs, out_specs=[dqk_spec, db_spec],
                     out_shape=[per_head, db_shape])(*inputs)
    dk, dv, d_b, d_keys, through = launch(
        "keys", in_specs=in_specs + [db_spec], out_specs=out_specs[1:] + [through_spec],
        out_shape=out_shape[1:] + [through_shape],
        input_output_aliases={len(inputs): 2})(*inputs, d_b)
    grads = launch("exact", in_specs=in_specs + out_specs, out_specs=out_specs,
                   out_shape=out_shape,
                   input_output_aliases={len(inputs) + i: i for i in range(5)},
                   )(*inputs, dq, dk, dv, d_b, d_keys)
  dq, dk, dv, d_b, d_keys = grads
  return (*(x.sum(0) for x in (dq, dk)), dv,
          *(x.sum(0) for x in (d_b, d_keys, through)))


def log_decay_gradient(b, rel, resets, d_b, d_keys, through, plan):
  """dL/dg_t = Σ of P_ij over the pairs i ≥ t > j in t's run (see `_gradient_kernel`),
  gathered per chunk so that nothing large cancels: the pairs within the chunk or with
  the state entering it (a reverse sum of d_b from t), those of later queries with the
  chunk's keys before t (an exclusive sum of d_keys), and those of later queries with
  keys before the chunk (e^{b_C} through_n, if the chunk holds no reset; through
  `[B, H, N, K]` is Σ_v dh ⊙ h_n from `_gradient_kernel`). `_decay_gradient_kernel`,
  one program per (batch, chunk, head)."""
  spec = chunk_rows_spec(b, plan.chunk)
  rows = chunk_rows_spec(rel, plan.chunk)
  through_spec = pl.BlockSpec((None, None, None, through.shape[-1]),
                              lambda n, t, h: (n, h, t, 0))
  return pallas_call(
      plan, _decay_gradient_kernel, "linear_attention_decay_gradient",
      grid=(b.shape[0], plan.chunks, b.shape[2]),
      in_specs=[spec, spec, through_spec, spec, rows, rows], out_specs=spec,
      out_shape=jax.ShapeDtypeStruct(b.shape, jnp.float32),
  )(d_b, d_keys, through, b, rel, resets.astype(jnp.int32))
