"""Multi-scale deformable attention as Pallas kernels for NVIDIA GPUs (the Triton backend).

`multi_scale_deformable_attention_pallas_gpu` has the registry signature of
`mpformer_jax.ops.msda` and the same semantics as `multi_scale_deformable_attention_xla`
(Deformable-DETR's `ms_deform_attn_core_pytorch`, i.e. per level `grid_sample(bilinear,
zeros padding, align_corners=False)`), computed by two `pl.pallas_call`s paired by a
`jax.custom_vjp`:

* Forward, grid (batch, heads, query blocks of `block_q` queries). A program loops over the
  L * P samples (level sizes are static and looked up per iteration); per sample it loads the
  locations and attention weights of its queries as `[block_q]` vectors, derives the 4
  bilinear corners with the arithmetic of `sampling.linear_taps` (corners outside the map get
  weight 0 and an index clamped into the map), gathers the `[block_q, 4, C]` corner rows from
  the value table of its (batch, head) with one array-indexed load (Triton: one pointer
  gather) and accumulates the weighted rows in a `[block_q, C]` float32 accumulator.
* Backward, the same grid and loop, one kernel for all three gradients. Per sample it gathers
  the corner rows again and takes `<value[corner], cotangent>` (`[block_q, 4]`); the
  attention-weight gradient is `sum_k w_k <value[k], ct>`, the location gradient goes through
  the derivative of the bilinear weights (times W or H for normalised coordinates), and the
  value gradient is one `plgpu.atomic_add` of the `[block_q, 4, C]` rows `a * w_k * ct` into a
  zero-initialised float32 buffer (queries of one program and of different programs sample
  the same pixels).

Layout: `value` stays `[B, S, heads, C]`. Its BlockSpec squeezes batch and heads, so a program
sees a `[S, C]` view whose rows are `heads * C` elements apart; a corner row is still `C`
contiguous elements, as it would be in a transposed `[B, heads, S, C]` table, so transposing
`value` (and transposing back its gradient) would only cost two extra passes over the
largest tensor. The value-gradient buffer uses the same layout.

Constraints of the Triton lowering and how they are met: every loaded or stored array must
have a power-of-two size, so `block_q` is a power of two and C is zero-padded to the next power
of two when it is not one (Mask2Former's C = 256 / 8 = 32 needs no padding); Q is zero-padded to
a multiple of `block_q` (padded queries have attention weight 0 and cotangent 0, so they add
nothing anywhere, and their outputs are sliced off). Both kernels lower to Triton IR on jax
0.10.2 without a GPU (tests/test_msda_pallas_gpu.py), and that IR compiled to sm_90 cubins
with the `triton` 3.9 package (no spills); they have not been run on a GPU.

Interpret mode (CPU tests): Pallas discharges an array-indexed `atomic_add` into
`ref.at[idx].set(ref[idx] + val)`, which keeps only one of several updates of the same row in
one call, whereas the GPU atomics add them all. With `interpret=True` the value gradient is
therefore added one corner row at a time (a `fori_loop` of row-indexed `atomic_add`s, exact in
interpret mode); on GPU it is one vectorised `atomic_add` per sample. The tests also run the
vectorised form in interpret mode where it is exact: `block_q=1` and 4 distinct corners.

Caveats: reverse-mode only (custom VJP); the value gradient's float32 atomic adds make it
non-deterministic in the last bits on GPU, and its float32 buffer is `B * S * heads * C * 4`
bytes whatever the input dtype; like the XLA implementation, a non-finite value at a clamped
(zero-weight) neighbour of an out-of-map corner poisons the sample (0 * inf).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mpformer_jax.ops import msda as msda_lib
from mpformer_jax.ops.sampling import LinearTaps, linear_taps

__all__ = ["multi_scale_deformable_attention_pallas_gpu"]

# Default queries per program: the largest power of two <= 64 whose [block_q, 4, C] gathered
# corners have at most _GATHER_ELEMENTS elements (32 per thread with 4 warps), i.e. 32 for
# Mask2Former's C = 32. Registers grow with that tensor: compiled for sm_90 (Triton 3.9) at
# C = 32, block_q = 32 takes 64-86 registers per thread in the forward and 127-159 in the
# backward, block_q = 64 takes 133-179 and 211-255 (no spills in either); the choice is not
# tuned on hardware.
MAX_BLOCK_Q = 64
_GATHER_ELEMENTS = 4096
_NUM_WARPS = 4


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static parameters of the kernels (hashable: a `nondiff_argnums` of the custom VJP)."""

  spatial_shapes: tuple[tuple[int, int], ...]
  block_q: int
  interpret: bool
  # Add value-gradient rows one query at a time (exact under interpret-mode discharge).
  serial_atomics: bool


def _next_power_of_2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _level_starts(spatial_shapes) -> list[int]:
  return [0, *np.cumsum([h * w for h, w in spatial_shapes])[:-1].tolist()]


# ------------------------------------------------------------------------------------------------
# Kernel helpers (traced inside the kernels)
# ------------------------------------------------------------------------------------------------


def _sample_taps(loc_ref, level, point, height, width):
  """x and y `LinearTaps` of one (level, point) of the block's queries (`[block_q]` arrays).

  level, point, height, width: traced int32 scalars.
  """
  x = loc_ref[:, level, point, 0].astype(jnp.float32)
  y = loc_ref[:, level, point, 1].astype(jnp.float32)
  # align_corners=False: normalised u maps to pixel u * size - 0.5 (as in msda._corners).
  tx = linear_taps(x * width.astype(jnp.float32) - 0.5, width)
  ty = linear_taps(y * height.astype(jnp.float32) - 0.5, height)
  return tx, ty


def _corners(start, width, tx: LinearTaps, ty: LinearTaps):
  """The 4 bilinear corners of each query of the block, corner k = 2 * dy + dx.

  start, width: traced int32 scalars (first row of the level in the table, level width).

  The corners are a second axis (rather than 4 separate vectors) so that each is one gather, one
  atomic add and one reduction of `[block_q, 4, C]` tensors.

  Returns:
    rows: `[block_q, 4]` int32 rows of the `[S, C]` table, clamped into the level's map.
    weight: `[block_q, 4]` float32 `ty.w[dy] * tx.w[dx]`, 0 for corners outside the map.
    dx, dy: `[1, 4]` int32 corner offsets.
  """
  k = lax.broadcasted_iota(jnp.int32, (1, 4), 1)
  # lax.rem/div (C semantics, equal to % and // here): jnp's floor-mod adds sign fix-ups that
  # the Triton lowering rejects.
  dx, dy = lax.rem(k, 2), lax.div(k, 2)
  pick = lambda d, lo, hi: jnp.where(d == 1, hi[:, None], lo[:, None])
  rows = start + pick(dy, ty.lo, ty.hi) * width + pick(dx, tx.lo, tx.hi)
  weight = pick(dy, ty.w_lo, ty.w_hi) * pick(dx, tx.w_lo, tx.w_hi)
  return rows, weight, dx, dy


def _channel_iota(channels: int) -> jax.Array:
  # An iota primitive, not jnp.arange: a numpy constant would be a captured kernel constant.
  return lax.broadcasted_iota(jnp.int32, (1, 1, channels), 2)


def _gather_rows(table_ref, rows: jax.Array) -> jax.Array:
  """`table[rows, :]` as float32: `[block_q, 4]` rows of a `[S, C]` ref -> `[block_q, 4, C]`.

  Both indexers are arrays (`[block_q, 4, 1]` and `[1, 1, C]`), which Triton lowers to one
  pointer gather and interpret mode to one XLA gather.
  """
  channels = table_ref.shape[-1]
  return table_ref[rows[:, :, None], _channel_iota(channels)].astype(jnp.float32)


def _atomic_add_rows(table_ref, rows: jax.Array, updates: jax.Array, serial: bool) -> None:
  """`table[rows[q, k], :] += updates[q, k]` for all (q, k), atomically; rows may repeat.

  Args:
    table_ref: `[S, C]` float32 ref.
    rows: `[block_q, 4]` int32 in `[0, S)`.
    updates: `[block_q, 4, C]` float32.
    serial: one `atomic_add` per row (see the module docstring: interpret mode only).
  """
  channels = table_ref.shape[-1]
  if not serial:
    # Both indexers are arrays: interpret mode has no discharge rule for arrays mixed with
    # slices in atomics.
    plgpu.atomic_add(table_ref, (rows[:, :, None], _channel_iota(channels)), updates)
    return

  rows = rows.reshape(-1)
  updates = updates.reshape(rows.shape[0], channels)

  def add_row(i, carry):
    plgpu.atomic_add(table_ref, (rows[i], pl.ds(0, channels)), updates[i])
    return carry

  lax.fori_loop(0, rows.shape[0], add_row, 0)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


def _lookup(index: jax.Array, values: Sequence[int]) -> jax.Array:
  """`values[index]` for a traced int32 scalar `index` and static python ints (a select chain)."""
  out = jnp.full((), values[0], jnp.int32)
  for i, v in enumerate(values[1:], start=1):
    out = jnp.where(index == i, v, out)
  return out


def _sample_geometry(config: _Config, sample: jax.Array, points: int):
  """`(level, point, height, width, start row)` of flat sample `level * P + point` (traced)."""
  level, point = lax.div(sample, points), lax.rem(sample, points)  # see _corners
  shapes = config.spatial_shapes
  height = _lookup(level, [h for h, _ in shapes])
  width = _lookup(level, [w for _, w in shapes])
  start = _lookup(level, _level_starts(shapes))
  return level, point, height, width, start


def _forward_kernel(value_ref, loc_ref, attn_ref, out_ref, *, config: _Config):
  """One (batch, head, query block).

  Refs: value `[S, C]`, loc `[block_q, L, P, 2]`, attn `[block_q, L, P]`, out `[block_q, C]`.
  """
  levels, points = attn_ref.shape[-2:]

  # One loop over the L * P samples (the level's size is looked up): the kernel's code size,
  # and the interpret-mode compile time, do not grow with L and P.
  def add_sample(sample, acc):
    level, point, height, width, start = _sample_geometry(config, sample, points)
    tx, ty = _sample_taps(loc_ref, level, point, height, width)
    a = attn_ref[:, level, point].astype(jnp.float32)
    rows, weight, _, _ = _corners(start, width, tx, ty)
    # (corner weight * a) * value, as in the XLA implementation.
    weight = weight * a[:, None]
    return acc + jnp.sum(_gather_rows(value_ref, rows) * weight[:, :, None], axis=1)

  acc = lax.fori_loop(0, levels * points, add_sample, jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def _backward_kernel(
  value_ref,
  loc_ref,
  attn_ref,
  ct_ref,
  d_value_init_ref,
  d_value_ref,
  d_loc_ref,
  d_attn_ref,
  *,
  config: _Config,
):
  """One (batch, head, query block): all three gradients.

  Refs: value `[S, C]`, loc `[block_q, L, P, 2]`, attn `[block_q, L, P]`, ct `[block_q, C]`,
  d_value `[S, C]` float32 (aliased to the zeros `d_value_init`, accumulated atomically by all
  query blocks), d_loc and d_attn shaped like loc and attn (written by this program only).
  """
  del d_value_init_ref  # Only there to zero-initialise d_value through the alias.
  levels, points = attn_ref.shape[-2:]
  ct = ct_ref[...].astype(jnp.float32)[:, None, :]  # [block_q, 1, C]

  def sample_gradients(sample, carry):
    level, point, height, width, start = _sample_geometry(config, sample, points)
    tx, ty = _sample_taps(loc_ref, level, point, height, width)
    a = attn_ref[:, level, point].astype(jnp.float32)
    rows, weight, dx, dy = _corners(start, width, tx, ty)
    updates = ct * (weight * a[:, None])[:, :, None]  # d value of each corner row
    _atomic_add_rows(d_value_ref, rows, updates, config.serial_atomics)
    dots = jnp.sum(_gather_rows(value_ref, rows) * ct, axis=2)  # <value[corner], ct>
    # d attn = <sample, ct> = sum_k w_k <value[k], ct>.
    d_attn_ref[:, level, point] = jnp.sum(weight * dots, axis=1).astype(d_attn_ref.dtype)
    # Chain rule through w_k = ty.w[dy] * tx.w[dx]: d w_lo / dx = -valid_lo and
    # d w_hi / dx = valid_hi (floor has zero derivative); d pixel / d normalised = size.
    pick = lambda d, lo, hi: jnp.where(d == 1, hi[:, None], lo[:, None])
    slope = lambda t: (-t.valid_lo.astype(jnp.float32), t.valid_hi.astype(jnp.float32))
    d_wx = pick(dx, *slope(tx)) * pick(dy, ty.w_lo, ty.w_hi)  # d w_k / d x_pixel
    d_wy = pick(dy, *slope(ty)) * pick(dx, tx.w_lo, tx.w_hi)
    d_x = jnp.sum(d_wx * dots, axis=1) * (a * width.astype(jnp.float32))
    d_y = jnp.sum(d_wy * dots, axis=1) * (a * height.astype(jnp.float32))
    d_loc_ref[:, level, point, 0] = d_x.astype(d_loc_ref.dtype)
    d_loc_ref[:, level, point, 1] = d_y.astype(d_loc_ref.dtype)
    return carry

  lax.fori_loop(0, levels * points, sample_gradients, 0)


# ------------------------------------------------------------------------------------------------
# pallas_calls
# ------------------------------------------------------------------------------------------------


def _specs(config: _Config, value_shape, loc_shape):
  """BlockSpecs of value-like, loc-like, attn-like and per-query `[B, Qp, heads, C]` arrays."""
  _, length, _, channels = value_shape
  _, _, _, levels, points, _ = loc_shape
  bq = config.block_q
  table = pl.BlockSpec((None, length, None, channels), lambda b, h, i: (b, 0, h, 0))
  loc = pl.BlockSpec((None, bq, None, levels, points, 2), lambda b, h, i: (b, i, h, 0, 0, 0))
  attn = pl.BlockSpec((None, bq, None, levels, points), lambda b, h, i: (b, i, h, 0, 0))
  rows = pl.BlockSpec((None, bq, None, channels), lambda b, h, i: (b, i, h, 0))
  return table, loc, attn, rows


def _grid(config: _Config, value_shape, loc_shape):
  batch, _, heads, _ = value_shape
  return (batch, heads, loc_shape[1] // config.block_q)


def _forward_call(config: _Config, value, loc, attn):
  """Padded inputs (`Qp % block_q == 0`, C a power of two) -> `[B, Qp, heads, C]`."""
  batch, _, heads, channels = value.shape
  table, loc_spec, attn_spec, rows = _specs(config, value.shape, loc.shape)
  return pl.pallas_call(
    functools.partial(_forward_kernel, config=config),
    out_shape=jax.ShapeDtypeStruct((batch, loc.shape[1], heads, channels), value.dtype),
    grid=_grid(config, value.shape, loc.shape),
    in_specs=[table, loc_spec, attn_spec],
    out_specs=rows,
    compiler_params=plgpu.CompilerParams(num_warps=_NUM_WARPS),
    interpret=config.interpret,
    name="msda_forward",
  )(value, loc, attn)


def _backward_call(config: _Config, value, loc, attn, ct):
  """Padded inputs and `[B, Qp, heads, C]` cotangent -> (d_value f32, d_loc, d_attn)."""
  table, loc_spec, attn_spec, rows = _specs(config, value.shape, loc.shape)
  return pl.pallas_call(
    functools.partial(_backward_kernel, config=config),
    out_shape=(
      jax.ShapeDtypeStruct(value.shape, jnp.float32),
      jax.ShapeDtypeStruct(loc.shape, loc.dtype),
      jax.ShapeDtypeStruct(attn.shape, attn.dtype),
    ),
    grid=_grid(config, value.shape, loc.shape),
    in_specs=[table, loc_spec, attn_spec, rows, table],
    out_specs=(table, loc_spec, attn_spec),
    # Input 4 (zeros) becomes output 0: the atomic adds need a zeroed buffer, and Pallas
    # outputs are otherwise uninitialised.
    input_output_aliases={4: 0},
    compiler_params=plgpu.CompilerParams(num_warps=_NUM_WARPS),
    interpret=config.interpret,
    name="msda_backward",
  )(value, loc, attn, ct, jnp.zeros(value.shape, jnp.float32))


# ------------------------------------------------------------------------------------------------
# Padding and the custom VJP
# ------------------------------------------------------------------------------------------------


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `axis` of `x` at the end to `size` (no-op when it already has that size)."""
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _padded_sizes(config: _Config, value, loc) -> tuple[int, int]:
  queries = loc.shape[1]
  return -(-queries // config.block_q) * config.block_q, _next_power_of_2(value.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _msda(config: _Config, value, loc, attn):
  """`[B, S, heads, C]`, `[B, Q, heads, L, P, 2]`, `[B, Q, heads, L, P]` -> `[B, Q, heads, C]`."""
  return _msda_fwd(config, value, loc, attn)[0]


def _msda_fwd(config: _Config, value, loc, attn):
  queries, channels = loc.shape[1], value.shape[-1]
  padded_q, padded_c = _padded_sizes(config, value, loc)
  out = _forward_call(
    config,
    _pad_axis(value, 3, padded_c),
    _pad_axis(loc, 1, padded_q),
    _pad_axis(attn, 1, padded_q),
  )
  # Residuals are the inputs only (as in the XLA implementation and the CUDA kernel).
  return out[:, :queries, :, :channels], (value, loc, attn)


def _msda_bwd(config: _Config, res, ct):
  value, loc, attn = res
  queries, channels = loc.shape[1], value.shape[-1]
  padded_q, padded_c = _padded_sizes(config, value, loc)
  d_value, d_loc, d_attn = _backward_call(
    config,
    _pad_axis(value, 3, padded_c),
    _pad_axis(loc, 1, padded_q),
    _pad_axis(attn, 1, padded_q),
    # Zero cotangent rows and channels: padded queries and channels contribute nothing.
    _pad_axis(_pad_axis(ct, 3, padded_c), 1, padded_q),
  )
  return (
    d_value[..., :channels].astype(value.dtype),
    d_loc[:, :queries],
    d_attn[:, :queries],
  )


_msda.defvjp(_msda_fwd, _msda_bwd)


def multi_scale_deformable_attention_pallas_gpu(
  value: jax.Array,
  spatial_shapes: Sequence[Sequence[int]],
  sampling_locations: jax.Array,
  attention_weights: jax.Array,
  *,
  interpret: bool = False,
  block_q: int | None = None,
) -> jax.Array:
  """Multi-scale deformable attention with Pallas Triton kernels (NVIDIA GPUs).

  Same semantics as `msda.multi_scale_deformable_attention` (see there). Differentiable
  (custom VJP: reverse mode only) and jit-able; float32 or bfloat16 inputs are accumulated in
  float32.

  Args:
    value: `[B, S, heads, C]`, S = sum_l H_l * W_l.
    spatial_shapes: static `((H_0, W_0), ...)` python ints.
    sampling_locations: `[B, Q, heads, L, P, 2]` normalised (x, y).
    attention_weights: `[B, Q, heads, L, P]`.
    interpret: run the kernels in Pallas interpret mode (CPU testing).
    block_q: queries per program, a power of two; by default `_GATHER_ELEMENTS / (4 * C)`
      clipped to [1, `MAX_BLOCK_Q`] and to the next power of two >= Q.

  Returns:
    `[B, Q, heads * C]` in `value.dtype`.
  """
  return _msda_pallas_gpu(
    value,
    spatial_shapes,
    sampling_locations,
    attention_weights,
    interpret=interpret,
    block_q=block_q,
    serial_atomics=bool(interpret),
  )


def _msda_pallas_gpu(
  value,
  spatial_shapes,
  sampling_locations,
  attention_weights,
  *,
  interpret,
  block_q,
  serial_atomics,
):
  """`multi_scale_deformable_attention_pallas_gpu` with the choice of value-gradient atomics
  (tests run the GPU's vectorised atomics in interpret mode with `block_q=1`)."""
  spatial_shapes = msda_lib._static_spatial_shapes(spatial_shapes)
  msda_lib._check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
  batch, length, heads, channels = value.shape
  queries = sampling_locations.shape[1]
  if block_q is None:
    by_channels = _GATHER_ELEMENTS // (4 * _next_power_of_2(channels))
    block_q = max(1, min(MAX_BLOCK_Q, by_channels, _next_power_of_2(queries)))
    block_q = 1 << (block_q.bit_length() - 1)  # a power of two
  if block_q < 1 or _next_power_of_2(block_q) != block_q:
    raise ValueError(f"block_q must be a power of two, got {block_q}")
  if length >= 2**31:
    raise ValueError(f"value {value.shape} has too many positions for int32 row indices")
  config = _Config(
    spatial_shapes=spatial_shapes,
    block_q=block_q,
    interpret=bool(interpret),
    serial_atomics=bool(serial_atomics),
  )
  out = _msda(config, value, sampling_locations, attention_weights)
  return out.reshape(batch, queries, heads * channels)
