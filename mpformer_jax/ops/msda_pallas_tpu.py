"""Multi-scale deformable attention as a Pallas Mosaic TPU kernel (one-hot matmul gather).

Semantics are those of `mpformer_jax.ops.msda.multi_scale_deformable_attention` (Deformable-DETR
`ms_deform_attn_core_pytorch`: bilinear `grid_sample`, zero padding, `align_corners=False`);
`multi_scale_deformable_attention_pallas_tpu` has the signature of an `msda.IMPLEMENTATIONS`
entry.

The TPU TensorCore has no general gather, so the MXU does it: for one (batch, head), a block of
`block_q` queries and a tile of `block_s` value positions of one level, the kernel builds the
transposed bilinear interpolation matrix

  At[s, q] = sum_{p, k} w[p, k, q] * (s == corner[p, k, q])    [block_s, block_q]

from iota comparisons (`w` = bilinear corner weight times attention weight, corner -1 for
corners outside the map, so they never match) and multiplies it with the value tile:
`out^T[C, q] += value^T[C, s] @ At[s, q]`, accumulated in float32 over all tiles of all levels.
Positions sit on sublanes and queries on lanes, so every per-query quantity is a `[1, block_q]`
row that broadcasts along sublanes and the output block `[C, block_q]` is lane dense.

Layout (prepared by XLA around the kernels):

* `value` is regrouped per (batch, head) as `[C, S_pad]` (and `[S_pad, C]` for the backward),
  each level zero-padded to a multiple of `block_s`, so that a position tile never straddles two
  levels. Scalar-prefetched tables give each tile its level and its first position in the level.
* Corner indices (flat `y * W_l + x` in the level, -1 outside the map) and weights of every
  (level, point, corner) are computed elementwise by XLA as `[B, heads, L, 4P, Q_pad]` rows.
* Tile skipping: a query block only touches tiles that contain one of its corners. XLA computes,
  per (batch, head, query block, level), the first and last such tile (scalar prefetch); the
  kernels skip the tiles outside (`pl.when`), and the value index maps clamp into that range so
  that skipped tiles are not even copied from HBM (the d-value kernel, which iterates over query
  blocks per tile, clamps its query blocks with the transposed table). Without this the cost is
  O(Q * S) per head; with spatially coherent queries (the pixel decoder's queries are the pixels
  themselves) it is about O(Q * the tiles near the query block).

Gradients (`jax.custom_vjp`, residuals = the inputs):

* d value (`_bwd_value_kernel`, grid `(B, heads, tile, query block)`): `dV^T[C, s] +=
  ct^T[C, q] @ At[s, q]^T`, accumulated over query blocks in the revisited output block.
* Per-corner dot products `<value[corner], ct>` (`_bwd_dots_kernel`, grid
  `(B, heads, query block, tile)`): `Gt = value[s, C] @ ct^T[C, q]`, then for each of the 4P
  corner rows the column sums of `Gt` masked by the one-hot corner mask, accumulated over the
  tiles of a level. XLA then applies the chain rule through the corner weights (d attention =
  sum of bilinear weight * dot, d location = sum of d weight/d x * dot times attention * W_l or
  H_l), exactly as the XLA implementation does.

Precision: float32 inputs use float32 matmuls (`Precision.HIGHEST`). For bfloat16 inputs the
value/cotangent operand is exact in bfloat16, and the float32 interpolation matrix is split into
`hi + lo` bfloat16 parts (two single-pass MXU matmuls, relative error ~2^-17 instead of the
2^-9 of rounding the weights to bfloat16); everything accumulates in float32 and the output is
cast to `value.dtype`.

Limits and caveats: the tile-range tables live in SMEM (1 MiB per core on TPU v4 and later;
16 KiB on v2/v3); the batch is split into several kernel calls when they would exceed
`_MAX_RANGE_ENTRIES`. Reverse-mode only (custom VJP). A non-finite entry of `value` poisons
every query whose block touches its tile (the one-hot matmul multiplies it by 0), where the
XLA implementation only spreads it to samples next to it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mpformer_jax.ops.sampling import LinearTaps, linear_taps

__all__ = ["multi_scale_deformable_attention_pallas_tpu"]

# Default block sizes: queries on the 128 lanes, positions on sublanes (a multiple of 8, and of
# 128 because position tiles are also the lane axis of the value^T block).
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_S = 512
# Entries of the int32 tile-range table per kernel call (256 KiB of SMEM); larger batches are
# split into several calls.
_MAX_RANGE_ENTRIES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static configuration of one call (hashable: a `custom_vjp` non-differentiable argument)."""

  spatial_shapes: tuple[tuple[int, int], ...]
  block_q: int
  block_s: int
  interpret: bool

  @property
  def num_levels(self) -> int:
    return len(self.spatial_shapes)

  @property
  def level_tiles(self) -> tuple[int, ...]:
    """Number of position tiles of each level."""
    return tuple(-(-(h * w) // self.block_s) for h, w in self.spatial_shapes)

  @property
  def level_first_tile(self) -> tuple[int, ...]:
    """Global index of the first tile of each level."""
    return tuple(int(x) for x in np.cumsum((0, *self.level_tiles))[:-1])

  @property
  def num_tiles(self) -> int:
    return sum(self.level_tiles)

  def tile_tables(self) -> tuple[np.ndarray, np.ndarray]:
    """`[T]` int32 level of every tile and `[T]` int32 first position of the tile in its level."""
    level = np.concatenate([np.full(n, lvl, np.int32) for lvl, n in enumerate(self.level_tiles)])
    start = np.concatenate([np.arange(n, dtype=np.int32) * self.block_s for n in self.level_tiles])
    return level, start

  def interpret_params(self):
    # TPU interpret mode simulates TPU memory spaces, DMAs and the grid on CPU (and checks
    # out-of-bounds reads and fills uninitialised buffers with NaN).
    return pltpu.InterpretParams() if self.interpret else False


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


def _interp_matrix_t(idx: jax.Array, w: jax.Array, tile_start, block_s: int) -> jax.Array:
  """Transposed interpolation matrix of one position tile from one-hot iota comparisons.

  Args:
    idx: `[J, Qb]` int32 flat corner positions in the level (-1: outside the map).
    w: `[J, Qb]` float32 corner weights (bilinear weight times attention weight).
    tile_start: first level position of the tile (int32 scalar).
    block_s: tile size.

  Returns:
    `[block_s, Qb]` float32, `At[s, q] = sum_j w[j, q] * (tile_start + s == idx[j, q])`.
  """
  rel = idx - tile_start  # corners outside this tile fall outside [0, block_s) and never match
  pos = lax.broadcasted_iota(jnp.int32, (block_s, idx.shape[1]), 0)
  at = jnp.zeros((block_s, idx.shape[1]), jnp.float32)
  for j in range(idx.shape[0]):
    at = at + jnp.where(pos == rel[j : j + 1, :], w[j : j + 1, :], 0.0)
  return at


def _weights_dot(data: jax.Array, at: jax.Array, dims) -> jax.Array:
  """`lax.dot_general(data, at, dims)` in float32, `at` being the float32 interpolation matrix.

  bfloat16 `data` is exact in bfloat16, so only `at` needs more than one MXU pass: it is split
  into `hi + lo` bfloat16 parts. float32 `data` uses a full-precision float32 matmul.
  """
  dims = (dims, ((), ()))
  if data.dtype == jnp.bfloat16:
    hi = at.astype(jnp.bfloat16)
    lo = (at - hi.astype(jnp.float32)).astype(jnp.bfloat16)
    dot = functools.partial(lax.dot_general, preferred_element_type=jnp.float32)
    return dot(data, hi, dims) + dot(data, lo, dims)
  return lax.dot_general(
    data.astype(jnp.float32),
    at,
    dims,
    precision=lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )


def _range_slot(ranges_ref, b, h, qi, level, *, heads: int, num_q_blocks: int, num_levels: int):
  """First and last tile that query block `qi` of (b, h) touches on `level` (first > last: none)."""
  slot = (((b * heads + h) * num_q_blocks + qi) * num_levels + level) * 2
  return ranges_ref[slot], ranges_ref[slot + 1]


def _clamp_tile(ranges_ref, b, h, qi, t, tile_level_ref, *, heads, nq, levels):
  """`t` clamped into the touched tile range of query block `qi` on `t`'s level.

  Used by value index maps: over skipped tiles the block index stays constant, so the pipeline
  does not copy them from HBM.
  """
  first, last = _range_slot(
    ranges_ref, b, h, qi, tile_level_ref[t], heads=heads, num_q_blocks=nq, num_levels=levels
  )
  return jnp.clip(t, jnp.minimum(first, last), last)


def _fwd_kernel(
  tile_level_ref, tile_start_ref, ranges_ref, idx_ref, w_ref, vt_ref, out_ref, *, cfg, heads, nq
):
  """Grid (b, h, qi, t). `out_ref` `[C, Qb]` float32 accumulates over all tiles of all levels."""
  b, h, qi, t = (pl.program_id(i) for i in range(4))

  @pl.when(t == 0)
  def _():
    out_ref[...] = jnp.zeros_like(out_ref)

  first, last = _range_slot(
    ranges_ref, b, h, qi, tile_level_ref[t], heads=heads, num_q_blocks=nq, num_levels=cfg.num_levels
  )

  @pl.when((t >= first) & (t <= last))
  def _():
    at = _interp_matrix_t(idx_ref[...], w_ref[...], tile_start_ref[t], cfg.block_s)
    out_ref[...] += _weights_dot(vt_ref[...], at, ((1,), (0,)))  # [C, S] @ [S, Qb]


def _bwd_dots_kernel(
  tile_level_ref, tile_start_ref, ranges_ref, idx_ref, v_ref, ctt_ref, dots_ref, *, cfg, heads, nq
):
  """Grid (b, h, qi, t). `dots_ref` `[4P, Qb]` accumulates over the tiles of one level."""
  b, h, qi, t = (pl.program_id(i) for i in range(4))
  tile_start = tile_start_ref[t]

  @pl.when(tile_start == 0)  # first tile of a level: a new output block
  def _():
    dots_ref[...] = jnp.zeros_like(dots_ref)

  first, last = _range_slot(
    ranges_ref, b, h, qi, tile_level_ref[t], heads=heads, num_q_blocks=nq, num_levels=cfg.num_levels
  )

  @pl.when((t >= first) & (t <= last))
  def _():
    v, ctt = v_ref[...], ctt_ref[...]
    if v.dtype == jnp.bfloat16:  # exact products, float32 sums
      gt = jnp.dot(v, ctt, preferred_element_type=jnp.float32)
    else:
      gt = jnp.dot(
        v.astype(jnp.float32),
        ctt.astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
      )
    # gt[s, q] = <value[tile_start + s], ct[q]>; pick each corner's row with its one-hot mask.
    rel = idx_ref[...] - tile_start
    pos = lax.broadcasted_iota(jnp.int32, gt.shape, 0)
    for j in range(rel.shape[0]):
      picked = jnp.where(pos == rel[j : j + 1, :], gt, 0.0)
      dots_ref[j : j + 1, :] += jnp.sum(picked, axis=0, keepdims=True)


def _bwd_value_kernel(
  tile_level_ref,
  tile_start_ref,
  ranges_ref,
  q_ranges_ref,
  idx_ref,
  w_ref,
  ctt_ref,
  dvt_ref,
  *,
  cfg,
  heads,
  nq,
):
  """Grid (b, h, t, qi). `dvt_ref` `[C, S_tile]` float32 accumulates over query blocks."""
  del q_ranges_ref  # only used by the index maps
  b, h, t, qi = (pl.program_id(i) for i in range(4))

  @pl.when(qi == 0)
  def _():
    dvt_ref[...] = jnp.zeros_like(dvt_ref)

  first, last = _range_slot(
    ranges_ref, b, h, qi, tile_level_ref[t], heads=heads, num_q_blocks=nq, num_levels=cfg.num_levels
  )

  @pl.when((t >= first) & (t <= last))
  def _():
    at = _interp_matrix_t(idx_ref[...], w_ref[...], tile_start_ref[t], cfg.block_s)
    dvt_ref[...] += _weights_dot(ctt_ref[...], at, ((1,), (1,)))  # [C, Qb] @ [S, Qb]^T


# ------------------------------------------------------------------------------------------------
# XLA-side preparation
# ------------------------------------------------------------------------------------------------


class _Prepared(NamedTuple):
  """Kernel inputs derived elementwise from the locations and attention weights.

  Attributes:
    idx: `[B, heads, L, 4P, Q_pad]` int32 flat corner positions in their level, -1 outside the
      map and for padded queries; row `4 * p + k`, corner k = 2 * dy + dx.
    w: `[B, heads, L, 4P, Q_pad]` float32 corner weights times attention weights (0 where idx
      is -1).
    ranges: `[B * heads * nQ * L * 2]` int32 (first, last) touched tile of each query block
      and level, (first_tile_of_level + 1, first_tile_of_level) when there is none. The
      kernels treat every tile in [first, last] as touched.
    q_ranges: `[B * heads * T * 2]` int32 (first, last) query block that touches each tile
      (in the sense of `ranges`), (1, 0) when there is none.
    tx, ty: the x / y `LinearTaps` (`[B, Q, heads, L, P]`), for the backward's chain rule.
  """

  idx: jax.Array
  w: jax.Array
  ranges: jax.Array
  q_ranges: jax.Array
  tx: LinearTaps
  ty: LinearTaps


def _prepare(cfg: _Config, loc: jax.Array, attn: jax.Array) -> _Prepared:
  """Corner indices, weights and touched tile ranges (XLA, elementwise and small reductions).

  Args:
    cfg: static configuration.
    loc: `[B, Q, heads, L, P, 2]` normalised (x, y).
    attn: `[B, Q, heads, L, P]`.
  """
  batch, queries, heads, levels, points, _ = loc.shape
  q_pad = _round_up(queries, cfg.block_q)
  heights = np.array([h for h, _ in cfg.spatial_shapes], np.int32)[:, None]  # [L, 1]
  widths = np.array([w for _, w in cfg.spatial_shapes], np.int32)[:, None]
  loc = loc.astype(jnp.float32)
  a = attn.astype(jnp.float32)
  # align_corners=False: normalised u is pixel u * size - 0.5.
  tx = linear_taps(loc[..., 0] * widths.astype(np.float32) - 0.5, widths)
  ty = linear_taps(loc[..., 1] * heights.astype(np.float32) - 0.5, heights)
  idx, w = [], []
  for y, vy, wy in [(ty.lo, ty.valid_lo, ty.w_lo), (ty.hi, ty.valid_hi, ty.w_hi)]:
    for x, vx, wx in [(tx.lo, tx.valid_lo, tx.w_lo), (tx.hi, tx.valid_hi, tx.w_hi)]:
      # -1 never matches a position: out-of-map corners never enter the one-hot matrices.
      idx.append(jnp.where(vy & vx, y * widths + x, -1))
      w.append(wy * wx * a)  # same product order as the XLA implementation

  def to_rows(corners, fill):  # 4 x [B, Q, heads, L, P] -> [B, heads, L, 4P, Q_pad]
    x = jnp.moveaxis(jnp.stack(corners, -1), 1, -1)  # [B, heads, L, P, 4, Q]
    x = x.reshape(batch, heads, levels, 4 * points, queries)
    return jnp.pad(x, ((0, 0),) * 4 + ((0, q_pad - queries),), constant_values=fill)

  idx = to_rows(idx, -1)
  w = to_rows(w, 0.0)

  # Touched tile range of every (b, h, query block, level).
  nq = q_pad // cfg.block_q
  first_tile = np.array(cfg.level_first_tile, np.int32)[:, None, None]  # [L, 1, 1]
  tile = jnp.where(idx >= 0, first_tile + idx // cfg.block_s, -1)
  tile = tile.reshape(batch, heads, levels, 4 * points, nq, cfg.block_q)
  big = np.int32(np.iinfo(np.int32).max)
  lo = jnp.min(jnp.where(tile >= 0, tile, big), axis=(3, 5))  # [B, heads, L, nQ]
  hi = jnp.max(tile, axis=(3, 5))
  # An empty range is (first + 1, first): it skips every tile and the clamped value index map
  # still points at a valid tile of the level.
  empty = hi < 0
  lo = jnp.where(empty, first_tile[..., 0] + 1, lo)
  hi = jnp.where(empty, first_tile[..., 0], hi)
  lo, hi = lo.transpose(0, 1, 3, 2), hi.transpose(0, 1, 3, 2)  # [B, heads, nQ, L]
  ranges = jnp.stack([lo, hi], -1).reshape(-1)

  # The same relation seen from the tiles: first and last query block whose range holds tile t.
  tile_level, _ = cfg.tile_tables()
  t = np.arange(cfg.num_tiles, dtype=np.int32)
  touched = (t >= lo[..., tile_level]) & (t <= hi[..., tile_level])  # [B, heads, nQ, T]
  qi = np.arange(nq, dtype=np.int32)[:, None]
  q_lo = jnp.min(jnp.where(touched, qi, big), axis=2)  # [B, heads, T]
  q_hi = jnp.max(jnp.where(touched, qi, -1), axis=2)
  empty = q_hi < 0
  q_lo, q_hi = jnp.where(empty, 1, q_lo), jnp.where(empty, 0, q_hi)
  q_ranges = jnp.stack([q_lo, q_hi], -1).reshape(-1)
  return _Prepared(idx=idx, w=w, ranges=ranges, q_ranges=q_ranges, tx=tx, ty=ty)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _value_tiles(cfg: _Config, value: jax.Array) -> jax.Array:
  """`[B, S, heads, C]` -> `[B, S_pad, heads, C]`, each level zero-padded to whole tiles."""
  parts, start = [], 0
  for (h, w), tiles in zip(cfg.spatial_shapes, cfg.level_tiles, strict=True):
    size = h * w
    level = value[:, start : start + size]
    parts.append(jnp.pad(level, ((0, 0), (0, tiles * cfg.block_s - size), (0, 0), (0, 0))))
    start += size
  return jnp.concatenate(parts, axis=1)


def _untile_value(cfg: _Config, padded: jax.Array) -> jax.Array:
  """Inverse of `_value_tiles`: drops the padding positions of every level."""
  parts = []
  for (h, w), first in zip(cfg.spatial_shapes, cfg.level_first_tile, strict=True):
    start = first * cfg.block_s
    parts.append(padded[:, start : start + h * w])
  return jnp.concatenate(parts, axis=1)


def _spec(block: tuple[int, int], index_map, squeezed: int = 2) -> pl.BlockSpec:
  """A BlockSpec of `squeezed` leading unit (dropped) dimensions and a 2-D `block`."""
  return pl.BlockSpec((pl.squeezed,) * squeezed + block, index_map)


def _grid_spec(grid, in_specs, out_specs, num_scalar_prefetch=3):
  return pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=num_scalar_prefetch, grid=grid, in_specs=in_specs, out_specs=out_specs
  )


def _compiler_params(parallel_axes: int):
  # The last grid axis revisits an accumulator block, so it must run sequentially.
  return pltpu.CompilerParams(
    dimension_semantics=("parallel",) * parallel_axes + ("arbitrary",),
  )


# ------------------------------------------------------------------------------------------------
# pallas_calls
# ------------------------------------------------------------------------------------------------


def _forward(cfg: _Config, value, prep: _Prepared) -> jax.Array:
  """`[B, S, heads, C]` -> `[B, heads, C, Q_pad]` float32."""
  batch, _, heads, channels = value.shape
  rows, q_pad = prep.idx.shape[3], prep.idx.shape[4]
  nq = q_pad // cfg.block_q
  vt = _value_tiles(cfg, value).transpose(0, 2, 3, 1)  # [B, heads, C, S_pad]
  tile_level, tile_start = cfg.tile_tables()
  levels = cfg.num_levels

  def corner_map(b, h, qi, t, tl, ts, rg):
    return b, h, tl[t], 0, qi

  def value_map(b, h, qi, t, tl, ts, rg):
    return b, h, 0, _clamp_tile(rg, b, h, qi, t, tl, heads=heads, nq=nq, levels=levels)

  corner_spec = _spec((rows, cfg.block_q), corner_map, squeezed=3)
  kernel = functools.partial(_fwd_kernel, cfg=cfg, heads=heads, nq=nq)
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((batch, heads, channels, q_pad), jnp.float32),
    grid_spec=_grid_spec(
      grid=(batch, heads, nq, cfg.num_tiles),
      in_specs=[
        corner_spec,
        corner_spec,
        _spec((channels, cfg.block_s), value_map),
      ],
      out_specs=_spec((channels, cfg.block_q), lambda b, h, qi, t, *_: (b, h, 0, qi)),
    ),
    compiler_params=_compiler_params(3),
    interpret=cfg.interpret_params(),
    name="msda_tpu_fwd",
  )(jnp.asarray(tile_level), jnp.asarray(tile_start), prep.ranges, prep.idx, prep.w, vt)


def _backward_dots(cfg: _Config, value, prep: _Prepared, ctt) -> jax.Array:
  """Per-corner `<value[corner], ct>`: `[B, heads, L, 4P, Q_pad]` float32."""
  batch, _, heads, channels = value.shape
  levels, rows, q_pad = prep.idx.shape[2:]
  nq = q_pad // cfg.block_q
  v = _value_tiles(cfg, value).transpose(0, 2, 1, 3)  # [B, heads, S_pad, C]
  tile_level, tile_start = cfg.tile_tables()

  def corner_map(b, h, qi, t, tl, ts, rg):
    return b, h, tl[t], 0, qi

  def value_map(b, h, qi, t, tl, ts, rg):
    return b, h, _clamp_tile(rg, b, h, qi, t, tl, heads=heads, nq=nq, levels=levels), 0

  kernel = functools.partial(_bwd_dots_kernel, cfg=cfg, heads=heads, nq=nq)
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct(prep.idx.shape, jnp.float32),
    grid_spec=_grid_spec(
      grid=(batch, heads, nq, cfg.num_tiles),
      in_specs=[
        _spec((rows, cfg.block_q), corner_map, squeezed=3),
        _spec((cfg.block_s, channels), value_map),
        _spec((channels, cfg.block_q), lambda b, h, qi, t, *_: (b, h, 0, qi)),
      ],
      out_specs=_spec((rows, cfg.block_q), corner_map, squeezed=3),
    ),
    compiler_params=_compiler_params(3),
    interpret=cfg.interpret_params(),
    name="msda_tpu_bwd_dots",
  )(jnp.asarray(tile_level), jnp.asarray(tile_start), prep.ranges, prep.idx, v, ctt)


def _backward_value(cfg: _Config, value, prep: _Prepared, ctt) -> jax.Array:
  """d value: `[B, heads, C, S_pad]` float32."""
  batch, _, heads, channels = value.shape
  rows, q_pad = prep.idx.shape[3], prep.idx.shape[4]
  nq = q_pad // cfg.block_q
  tile_level, tile_start = cfg.tile_tables()

  num_tiles = cfg.num_tiles

  def clamp_q(b, h, t, qi, q_ranges_ref):
    # As for the value tiles in the other kernels: query blocks that touch no part of tile t
    # keep the block index constant, so their inputs are not copied again.
    slot = ((b * heads + h) * num_tiles + t) * 2
    first, last = q_ranges_ref[slot], q_ranges_ref[slot + 1]
    return jnp.clip(qi, jnp.minimum(first, last), last)

  def corner_map(b, h, t, qi, tl, ts, rg, qr):
    return b, h, tl[t], 0, clamp_q(b, h, t, qi, qr)

  def ct_map(b, h, t, qi, tl, ts, rg, qr):
    return b, h, 0, clamp_q(b, h, t, qi, qr)

  corner_spec = _spec((rows, cfg.block_q), corner_map, squeezed=3)
  kernel = functools.partial(_bwd_value_kernel, cfg=cfg, heads=heads, nq=nq)
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct(
      (batch, heads, channels, cfg.num_tiles * cfg.block_s), jnp.float32
    ),
    grid_spec=_grid_spec(
      grid=(batch, heads, cfg.num_tiles, nq),
      in_specs=[
        corner_spec,
        corner_spec,
        _spec((channels, cfg.block_q), ct_map),
      ],
      out_specs=_spec((channels, cfg.block_s), lambda b, h, t, qi, *_: (b, h, 0, t)),
      num_scalar_prefetch=4,
    ),
    compiler_params=_compiler_params(3),
    interpret=cfg.interpret_params(),
    name="msda_tpu_bwd_value",
  )(
    jnp.asarray(tile_level),
    jnp.asarray(tile_start),
    prep.ranges,
    prep.q_ranges,
    prep.idx,
    prep.w,
    ctt,
  )


# ------------------------------------------------------------------------------------------------
# custom_vjp
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _msda_core(cfg: _Config, value, loc, attn) -> jax.Array:
  """`[B, S, heads, C]`, `[B, Q, heads, L, P, 2]`, `[B, Q, heads, L, P]` -> `[B, Q, heads * C]`."""
  return _msda_fwd(cfg, value, loc, attn)[0]


def _msda_fwd(cfg: _Config, value, loc, attn):
  batch, queries = loc.shape[:2]
  out_t = _forward(cfg, value, _prepare(cfg, loc, attn))  # [B, heads, C, Q_pad]
  out = out_t[..., :queries].transpose(0, 3, 1, 2).reshape(batch, queries, -1)
  # Residuals are the inputs: the corners are cheap to recompute elementwise.
  return out.astype(value.dtype), (value, loc, attn)


def _msda_bwd(cfg: _Config, res, ct):
  value, loc, attn = res
  batch, queries, heads, levels, points, _ = loc.shape
  channels = value.shape[-1]
  prep = _prepare(cfg, loc, attn)
  q_pad = prep.idx.shape[-1]
  # ct^T per (b, h): [B, heads, C, Q_pad], in value's dtype (bf16 cotangents stay exact).
  ctt = ct.astype(value.dtype).reshape(batch, queries, heads, channels).transpose(0, 2, 3, 1)
  ctt = jnp.pad(ctt, ((0, 0), (0, 0), (0, 0), (0, q_pad - queries)))

  dvt = _backward_value(cfg, value, prep, ctt)  # [B, heads, C, S_pad]
  d_value = _untile_value(cfg, dvt.transpose(0, 3, 1, 2)).astype(value.dtype)

  dots = _backward_dots(cfg, value, prep, ctt)[..., :queries]  # [B, heads, L, 4P, Q]
  dots = jnp.moveaxis(dots.reshape(batch, heads, levels, points, 4, queries), -1, 1)
  # Chain rule through w[dy, dx] = a * ty.w[dy] * tx.w[dx] (floor has zero derivative, so
  # d w_lo / d x = -valid_lo and d w_hi / d x = valid_hi), as in the XLA implementation.
  tx, ty = prep.tx, prep.ty
  f32 = jnp.float32
  fx = lambda lo, hi: jnp.stack([lo, hi, lo, hi], -1)  # per-corner factor of the x tap
  fy = lambda lo, hi: jnp.stack([lo, lo, hi, hi], -1)
  cw = fy(ty.w_lo, ty.w_hi) * fx(tx.w_lo, tx.w_hi)
  sx = fx(-tx.valid_lo.astype(f32), tx.valid_hi.astype(f32)) * fy(ty.w_lo, ty.w_hi)
  sy = fy(-ty.valid_lo.astype(f32), ty.valid_hi.astype(f32)) * fx(tx.w_lo, tx.w_hi)
  a = attn.astype(f32)
  widths = np.array([w for _, w in cfg.spatial_shapes], np.float32)[:, None]
  heights = np.array([h for h, _ in cfg.spatial_shapes], np.float32)[:, None]
  d_attn = jnp.sum(cw * dots, -1)
  d_x = jnp.sum(sx * dots, -1) * (a * widths)
  d_y = jnp.sum(sy * dots, -1) * (a * heights)
  d_loc = jnp.stack([d_x, d_y], -1)
  return d_value, d_loc.astype(loc.dtype), d_attn.astype(attn.dtype)


_msda_core.defvjp(_msda_fwd, _msda_bwd)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def multi_scale_deformable_attention_pallas_tpu(
  value: jax.Array,
  spatial_shapes: Sequence[Sequence[int]],
  sampling_locations: jax.Array,
  attention_weights: jax.Array,
  *,
  interpret: bool = False,
  block_q: int = DEFAULT_BLOCK_Q,
  block_s: int = DEFAULT_BLOCK_S,
) -> jax.Array:
  """Multi-scale deformable attention on the TPU TensorCore (Pallas Mosaic).

  Same semantics as `mpformer_jax.ops.msda.multi_scale_deformable_attention`; differentiable
  (reverse mode) w.r.t. all three arrays and jit-able.

  Args:
    value: `[B, S, heads, C]` float32 or bfloat16, S = sum_l H_l * W_l.
    spatial_shapes: static `((H_0, W_0), ...)` python ints.
    sampling_locations: `[B, Q, heads, L, P, 2]` normalised (x, y).
    attention_weights: `[B, Q, heads, L, P]`.
    interpret: run the kernels in TPU interpret mode (on CPU, for testing).
    block_q: queries per block (a multiple of 128: queries are the lane axis).
    block_s: value positions per tile (a multiple of 128); levels are padded to whole tiles, and
      larger levels are processed tile by tile, which bounds VMEM.

  Returns:
    `[B, Q, heads * C]` in `value.dtype` (accumulated in float32).
  """
  shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  if block_q % 128 or block_s % 128 or block_q <= 0 or block_s <= 0:
    raise ValueError(
      f"block_q and block_s must be positive multiples of 128, got {block_q}, {block_s}"
    )
  batch, length, heads, _ = value.shape
  queries = sampling_locations.shape[1]
  # Shapes are also checked by the `msda` dispatcher; repeated here for direct calls.
  if length != sum(h * w for h, w in shapes):
    raise ValueError(f"value has S={length} positions but spatial_shapes are {shapes}")
  expected = (batch, queries, heads, len(shapes))
  if sampling_locations.shape[:4] != expected or sampling_locations.shape[-1] != 2:
    raise ValueError(f"sampling_locations {sampling_locations.shape} must be {expected} + (P, 2)")
  if attention_weights.shape != sampling_locations.shape[:-1]:
    raise ValueError(
      f"attention_weights {attention_weights.shape} must be {sampling_locations.shape[:-1]}"
    )
  cfg = _Config(shapes, block_q, block_s, bool(interpret))
  # The tile-range tables (2 int32 per batch, head and query block and level, or tile) must
  # fit in SMEM.
  per_example = heads * ((-(-queries // block_q)) * len(shapes) + cfg.num_tiles) * 2
  chunk = max(1, _MAX_RANGE_ENTRIES // per_example)
  if batch <= chunk:
    return _msda_core(cfg, value, sampling_locations, attention_weights)
  outs = [
    _msda_core(
      cfg, value[i : i + chunk], sampling_locations[i : i + chunk], attention_weights[i : i + chunk]
    )
    for i in range(0, batch, chunk)
  ]
  return jnp.concatenate(outs, axis=0)
