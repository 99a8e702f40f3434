"""Multi-scale deformable attention (MSDA), the core op of the Mask2Former pixel decoder.

`multi_scale_deformable_attention` computes, for every query and head, an attention-weighted
sum of bilinear samples taken at learned locations on several feature levels. Its semantics are
exactly those of Deformable-DETR's `ms_deform_attn_core_pytorch`: each sample is
`grid_sample(value_level, 2 * loc - 1, mode="bilinear", padding_mode="zeros",
align_corners=False)`.

Implementations are chosen through a small registry, `IMPLEMENTATIONS`: "xla" (pure XLA: fast
on CPU, and the fallback everywhere), "pallas_gpu" (Pallas Triton kernels,
`msda_pallas_gpu.py`) and "pallas_tpu" (Pallas Mosaic kernels, `msda_pallas_tpu.py`). Both
kernels equal "xla" in interpret mode on CPU and lower for their hardware, but have not run on
it yet, so `implementation=None` still picks "xla" everywhere: a kernel becomes the default on
its platform by setting `default=True` in its entry, once measured there
(`experiments/bench_msda.py`). The dispatcher validates shapes for every implementation.

How the XLA implementation stays fast (measured on CPU, see experiments/bench_msda_cpu.py):

* Per example (the batch is a `jax.vmap`, which keeps gathers batch-local when the batch is
  sharded), the 4 bilinear corners of every level and point become row indices into the
  `[S * heads, C]` view of `value` (no transpose of `value`) plus one weight per corner that
  includes the attention weight and the zero-padding mask (out-of-map corners are clamped into
  the map and get weight 0).
* The weighted sum over the K = levels * points * 4 corners is written as K gathers added in a
  Python loop. XLA fuses them into ONE loop fusion that never writes the `[..., K, C]` gathered
  tensor; "one packed gather, then a sum/einsum over K" writes it (528 MB at the benchmark
  shape) and its forward is ~4x slower on CPU.
* A custom VJP keeps only the inputs as residuals. The backward computes the per-corner
  `<value[corner], cotangent>` as C column gathers added in one loop fusion, derives the
  location and attention-weight gradients from it by hand (only sums over the 4 corners, so XLA
  materialises it once), and the value gradient as float32 scatter-adds, one (level, point) per
  `lax.scan` step to bound the update tensor.

Caveats: reverse-mode only (custom VJP: no `jax.jvp`/`jacfwd`); a non-finite value at a clamped
(zero-weight) neighbour of an out-of-map corner still poisons the sample (0 * inf), where
PyTorch never reads it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mpformer_jax.ops.sampling import LinearTaps, linear_taps

__all__ = [
  "IMPLEMENTATIONS",
  "available_implementations",
  "default_implementation",
  "multi_scale_deformable_attention",
  "multi_scale_deformable_attention_xla",
]

SpatialShapes = tuple[tuple[int, int], ...]


# ------------------------------------------------------------------------------------------------
# Shape handling
# ------------------------------------------------------------------------------------------------


def _static_spatial_shapes(spatial_shapes: Sequence[Sequence[int]]) -> SpatialShapes:
  """Converts `spatial_shapes` to a tuple of python-int pairs (they must be static)."""
  try:
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError(
      "spatial_shapes must be a static sequence of (height, width) python ints, not a traced "
      f"array; got {spatial_shapes!r}"
    ) from e
  if not shapes or any(h <= 0 or w <= 0 for h, w in shapes):
    raise ValueError(f"spatial_shapes must be non-empty with positive sizes, got {shapes}")
  return shapes


def _check_shapes(value, spatial_shapes: SpatialShapes, sampling_locations, attention_weights):
  if value.ndim != 4:
    raise ValueError(f"value must be [B, S, heads, C], got shape {value.shape}")
  batch, length, heads, _ = value.shape
  total = sum(h * w for h, w in spatial_shapes)
  if length != total:
    raise ValueError(
      f"value has S={length} positions but spatial_shapes {spatial_shapes} sum to {total}"
    )
  num_levels = len(spatial_shapes)
  loc_shape = sampling_locations.shape
  if (
    len(loc_shape) != 6
    or loc_shape[0] != batch
    or loc_shape[2] != heads
    or loc_shape[3] != num_levels
    or loc_shape[5] != 2
  ):
    raise ValueError(
      f"sampling_locations must be [B={batch}, Q, heads={heads}, L={num_levels}, P, 2], got "
      f"{loc_shape}"
    )
  if attention_weights.shape != loc_shape[:5]:
    raise ValueError(
      f"attention_weights must be {loc_shape[:5]} (sampling_locations without the last axis), "
      f"got {attention_weights.shape}"
    )


# ------------------------------------------------------------------------------------------------
# XLA implementation
# ------------------------------------------------------------------------------------------------


class _Corners(NamedTuple):
  """Bilinear corners of every (query, head, level, point); see `_corners`."""

  rows: jax.Array  # [Q, heads, L, P, 4] int32 rows of the [S * heads, C] value table.
  tx: LinearTaps  # x taps, [Q, heads, L, P] arrays.
  ty: LinearTaps  # y taps, [Q, heads, L, P] arrays.


def _corners(
  spatial_shapes: SpatialShapes, length: int, heads: int, sampling_locations: jax.Array, ctype
) -> _Corners:
  """Row indices and separable bilinear weights of all corners of all samples of one example.

  Args:
    spatial_shapes: static `((H_l, W_l), ...)`.
    length, heads: S and heads of the example's `value` `[S, heads, C]`.
    sampling_locations: `[Q, heads, L, P, 2]` normalised (x, y).
    ctype: computation dtype (>= float32).

  Returns:
    `_Corners`; corner k = 2 * dy + dx of a sample has weight `ty.w[dy] * tx.w[dx]`.
  """
  heights = np.array([h for h, _ in spatial_shapes], np.int32)[:, None]  # [L, 1] vs [.., L, P]
  widths = np.array([w for _, w in spatial_shapes], np.int32)[:, None]
  starts = np.concatenate([[0], np.cumsum(heights * widths)[:-1]]).astype(np.int32)
  loc = sampling_locations.astype(ctype)
  # align_corners=False: normalised u maps to pixel u * size - 0.5.
  tx = linear_taps(loc[..., 0] * widths.astype(ctype) - 0.5, widths)
  ty = linear_taps(loc[..., 1] * heights.astype(ctype) - 0.5, heights)
  pix = jnp.stack(
    [
      ty.lo * widths + tx.lo,
      ty.lo * widths + tx.hi,
      ty.hi * widths + tx.lo,
      ty.hi * widths + tx.hi,
    ],
    axis=-1,
  )
  # Row of (position s, head m) in the [S * heads, C] view of value [S, heads, C]. Keeping
  # value's own layout avoids transposing value in the forward and its gradient in the backward.
  base = np.arange(heads, dtype=np.int32)[:, None, None, None] + (starts * heads)[:, None, None]
  return _Corners(rows=pix * heads + base, tx=tx, ty=ty)


def _corner_weights(c: _Corners) -> jax.Array:
  """`[..., L, P, 4]` bilinear weights of the corners (0 outside the map)."""
  return jnp.stack(
    [c.ty.w_lo * c.tx.w_lo, c.ty.w_lo * c.tx.w_hi, c.ty.w_hi * c.tx.w_lo, c.ty.w_hi * c.tx.w_hi],
    axis=-1,
  )


def _take_rows(table: jax.Array, rows: jax.Array) -> jax.Array:
  """`table[rows]` for in-bounds int32 `rows` (`[N, ...]` -> `[*rows.shape, ...]`).

  `lax.gather` directly rather than `table.at[rows].get(mode="promise_in_bounds")`, which still
  adds a negative-index wrap-around select per index.
  """
  dims = lax.GatherDimensionNumbers(
    offset_dims=tuple(range(rows.ndim, rows.ndim + table.ndim - 1)),
    collapsed_slice_dims=(0,),
    start_index_map=(0,),
  )
  return lax.gather(
    table,
    rows[..., None],
    dims,
    slice_sizes=(1, *table.shape[1:]),
    mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
  )


def _scatter_add_rows(table: jax.Array, rows: jax.Array, updates: jax.Array) -> jax.Array:
  """`table.at[rows].add(updates)` for in-bounds int32 `rows`; `updates` is `[*rows.shape, C]`."""
  dims = lax.ScatterDimensionNumbers(
    update_window_dims=(rows.ndim,),
    inserted_window_dims=(0,),
    scatter_dims_to_operand_dims=(0,),
  )
  return lax.scatter_add(
    table, rows[..., None], updates, dims, mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS
  )


def _gather_weighted_sum(table: jax.Array, rows: jax.Array, weights: jax.Array) -> jax.Array:
  """`out[..., c] = sum_k weights[..., k] * table[rows[..., k], c]`, accumulated in weights' dtype.

  Written as one gather per k added in a Python loop: XLA fuses the K gathers, products and adds
  into a single loop fusion over the `[..., C]` output, so the `[..., K, C]` gathered tensor is
  never written to memory (one packed gather followed by a sum or einsum over K writes it, and
  is ~4x slower on CPU).

  Args:
    table: `[N, C]`.
    rows: `[..., K]` int32 in `[0, N)` (not checked).
    weights: `[..., K]` float.

  Returns:
    `[..., C]` in `weights.dtype`.
  """
  out = None
  for k in range(rows.shape[-1]):
    term = _take_rows(table, rows[..., k]).astype(weights.dtype) * weights[..., k, None]
    out = term if out is None else out + term
  return out


def _row_dots(table: jax.Array, rows: jax.Array, vectors: jax.Array) -> jax.Array:
  """`out[..., k] = <table[rows[..., k]], vectors[...]>`, in vectors' dtype.

  Written as C scalar gathers of table columns added in a loop so that XLA emits one loop fusion
  over `[..., K]`; `sum(gathered * vectors, -1)` would write the `[..., K, C]` gathered tensor.

  Args:
    table: `[N, C]`.
    rows: `[..., K]` int32 in `[0, N)`.
    vectors: `[..., C]` (broadcast over K).
  """
  out = None
  for c in range(table.shape[1]):
    term = _take_rows(table[:, c], rows).astype(vectors.dtype) * vectors[..., c, None]
    out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _msda_xla_core(
  spatial_shapes: SpatialShapes, value: jax.Array, loc: jax.Array, attn: jax.Array
) -> jax.Array:
  """MSDA of ONE example: `[S, heads, C]`, `[Q, heads, L, P, 2]`, `[Q, heads, L, P]` ->
  `[Q, heads, C]` in the computation dtype (>= float32). Batched with `jax.vmap`."""
  return _msda_xla_fwd(spatial_shapes, value, loc, attn)[0]


def _ctype(value, loc, attn):
  return jnp.promote_types(jnp.result_type(value, loc, attn), jnp.float32)


def _msda_xla_fwd(spatial_shapes, value, loc, attn):
  length, heads, channels = value.shape
  ctype = _ctype(value, loc, attn)
  c = _corners(spatial_shapes, length, heads, loc, ctype)
  weights = _corner_weights(c) * attn.astype(ctype)[..., None]
  shape = (loc.shape[0], heads, -1)  # flatten (L, P, 4) into K
  table = value.reshape(length * heads, channels)
  out = _gather_weighted_sum(table, c.rows.reshape(shape), weights.reshape(shape))
  # Residuals are the inputs only: the corners are recomputed (cheap, elementwise) and the
  # gathered values are never stored, so memory is O(inputs) as with the CUDA kernel.
  return out, (value, loc, attn)


def _msda_xla_bwd(spatial_shapes, res, ct):
  value, loc, attn = res
  length, heads, channels = value.shape
  ctype = _ctype(value, loc, attn)
  c = _corners(spatial_shapes, length, heads, loc, ctype)
  a = attn.astype(ctype)
  ct = ct.astype(ctype)
  table = value.reshape(length * heads, channels)
  rows = c.rows.reshape(loc.shape[0], heads, -1)

  # d value: scatter-add of every corner's weighted cotangent, accumulated in ctype so that bf16
  # values do not lose precision while many corners add up. One (level, point) per scan step:
  # XLA would otherwise compute all [Q, heads, K, C] updates before the first scatter (528 MB
  # for the benchmark batch); per step they are L * P times smaller, and it is faster on CPU.
  samples = c.rows.shape[2] * c.rows.shape[3]  # L * P
  group_major = lambda x: jnp.moveaxis(x.reshape(*x.shape[:2], samples, 4), 2, 0)
  weights = _corner_weights(c) * a[..., None]

  def scatter_one_sample(d_table, sample):
    sample_rows, sample_weights = sample  # [Q, heads, 4] each
    updates = sample_weights[..., None] * ct[..., None, :]
    return _scatter_add_rows(d_table, sample_rows, updates), None

  d_table, _ = lax.scan(
    scatter_one_sample,
    jnp.zeros(table.shape, ctype),
    (group_major(c.rows), group_major(weights)),
  )
  d_value = d_table.astype(value.dtype).reshape(value.shape)

  # Per corner <value[corner], ct>: [Q, heads, L, P, 4].
  dots = _row_dots(table, rows, ct).reshape(c.rows.shape)
  # Chain rule through w[dy, dx] = a * ty.w[dy] * tx.w[dx], written by hand as three sums over
  # the 4 corners: XLA then writes `dots` once and reads it in cheap reductions (reductions,
  # not explicit additions of the 4 corners, which XLA fuses with `dots` into each of the three
  # consumers: the column gathers then ran three times, and R50 Mask2Former's forward+backward
  # at 512 x 512 went from ~10 s to ~15 s on a 2-core CPU). With autodiff's
  # version of this step XLA fused the C-term sum into two consumers and wrote all C gathered
  # columns to memory instead (4x slower backward on CPU).
  tx, ty = c.tx, c.ty
  cw = _corner_weights(c)
  fx = lambda lo, hi: jnp.stack([lo, hi, lo, hi], -1)  # per-corner factor of the x tap
  fy = lambda lo, hi: jnp.stack([lo, lo, hi, hi], -1)
  # d w_lo / dx = -valid_lo and d w_hi / dx = valid_hi (floor has zero derivative).
  sx = fx(-tx.valid_lo.astype(ctype), tx.valid_hi.astype(ctype)) * fy(ty.w_lo, ty.w_hi)
  sy = fy(-ty.valid_lo.astype(ctype), ty.valid_hi.astype(ctype)) * fx(tx.w_lo, tx.w_hi)
  d_attn = jnp.sum(cw * dots, -1)
  d_x = jnp.sum(sx * dots, -1)
  d_y = jnp.sum(sy * dots, -1)
  widths = np.array([w for _, w in spatial_shapes], np.float32)[:, None]
  heights = np.array([h for h, _ in spatial_shapes], np.float32)[:, None]
  d_loc = jnp.stack([d_x * (a * widths.astype(ctype)), d_y * (a * heights.astype(ctype))], -1)
  return d_value, d_loc.astype(loc.dtype), d_attn.astype(attn.dtype)


_msda_xla_core.defvjp(_msda_xla_fwd, _msda_xla_bwd)


def multi_scale_deformable_attention_xla(
  value: jax.Array,
  spatial_shapes: Sequence[Sequence[int]],
  sampling_locations: jax.Array,
  attention_weights: jax.Array,
  *,
  interpret: bool = False,
) -> jax.Array:
  """Pure-XLA multi-scale deformable attention; see `multi_scale_deformable_attention`.

  `interpret` is accepted for signature compatibility with the Pallas kernels and ignored.
  """
  del interpret  # Only meaningful for Pallas kernels.
  spatial_shapes = _static_spatial_shapes(spatial_shapes)
  _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
  batch, length, heads, _ = value.shape
  if batch * length * heads >= 2**31:
    raise ValueError(f"value {value.shape} is too large for int32 row indices")
  return _msda_xla_jit(spatial_shapes, value, sampling_locations, attention_weights)


# Jitted so that eager calls compile once per shape instead of dispatching the K + C unrolled
# gathers one by one; inside an outer jit this is simply inlined.
@functools.partial(jax.jit, static_argnums=(0,))
def _msda_xla_jit(spatial_shapes, value, sampling_locations, attention_weights):
  batch, _, heads, channels = value.shape
  # vmap over the batch (rather than flat indices into [B * S * heads, C]) gives gathers and
  # scatters with explicit batch dimensions, which the SPMD partitioner keeps local when the
  # batch is sharded; flat indices made it all-gather value across devices.
  out = jax.vmap(functools.partial(_msda_xla_core, spatial_shapes))(
    value, sampling_locations, attention_weights
  )
  return out.reshape(batch, out.shape[1], heads * channels).astype(value.dtype)


# ------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------

# Signature of every implementation:
#   fn(value, spatial_shapes, sampling_locations, attention_weights, *, interpret) -> [B, Q, h*C]
MsdaFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Implementation:
  """A registry entry.

  Attributes:
    fn: the implementation, or None for a reserved name that is not implemented yet.
    platforms: JAX platforms (`jax.default_backend()` values) it runs on; None for any. Used
      only to pick the default; an explicitly requested implementation is always attempted.
    default: whether `implementation=None` may pick it on its platforms (False for a kernel
      not yet run and timed on its hardware).
  """

  fn: MsdaFn | None
  platforms: tuple[str, ...] | None = None
  default: bool = True


def _pallas_gpu(value, spatial_shapes, sampling_locations, attention_weights, *, interpret):
  # Imported on first use: the kernels' modules import this one (shape checks, taps).
  from mpformer_jax.ops.msda_pallas_gpu import multi_scale_deformable_attention_pallas_gpu

  return multi_scale_deformable_attention_pallas_gpu(
    value, spatial_shapes, sampling_locations, attention_weights, interpret=interpret
  )


def _pallas_tpu(value, spatial_shapes, sampling_locations, attention_weights, *, interpret):
  from mpformer_jax.ops.msda_pallas_tpu import multi_scale_deformable_attention_pallas_tpu

  return multi_scale_deformable_attention_pallas_tpu(
    value, spatial_shapes, sampling_locations, attention_weights, interpret=interpret
  )


# Adding a kernel is one entry. Its function receives validated inputs and `spatial_shapes` as
# a tuple of python-int pairs, and must return value's dtype. The Triton kernel targets NVIDIA
# GPUs only (ROCm's Pallas lowering is untested), hence "cuda" and not "gpu"/"rocm".
IMPLEMENTATIONS: dict[str, Implementation] = {
  "xla": Implementation(multi_scale_deformable_attention_xla),
  "pallas_gpu": Implementation(_pallas_gpu, platforms=("gpu", "cuda"), default=False),
  "pallas_tpu": Implementation(_pallas_tpu, platforms=("tpu",), default=False),
}

# Order in which `implementation=None` tries the available implementations.
_PREFERENCE = ("pallas_gpu", "pallas_tpu", "xla")


def available_implementations() -> tuple[str, ...]:
  """Names of the implementations that exist (on any platform)."""
  return tuple(name for name, impl in IMPLEMENTATIONS.items() if impl.fn is not None)


def default_implementation(platform: str | None = None) -> str:
  """The implementation `implementation=None` uses on `platform` (default: JAX's backend)."""
  platform = jax.default_backend() if platform is None else platform
  for name in _PREFERENCE:
    impl = IMPLEMENTATIONS[name]
    runs_here = impl.platforms is None or platform in impl.platforms
    if impl.fn is not None and impl.default and runs_here:
      return name
  raise RuntimeError(f"no MSDA implementation runs on platform {platform!r}")


def multi_scale_deformable_attention(
  value: jax.Array,
  spatial_shapes: Sequence[Sequence[int]],
  sampling_locations: jax.Array,
  attention_weights: jax.Array,
  implementation: str | None = None,
  *,
  interpret: bool = False,
) -> jax.Array:
  """Multi-scale deformable attention (Deformable-DETR `ms_deform_attn_core_pytorch`).

  For each batch b, query q and head m:

    out[b, q, m*C:(m+1)*C] = sum_{l, p} attention_weights[b, q, m, l, p]
        * bilinear(value_l[b, :, :, m, :], sampling_locations[b, q, m, l, p])

  where `value_l` is level l of `value` viewed as `[B, H_l, W_l, heads, C]` and `bilinear` is
  `grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)` at normalised
  (x, y): pixel (x * W_l - 0.5, y * H_l - 0.5), reading zeros outside the map.

  Differentiable w.r.t. value, sampling_locations and attention_weights; works under jit,
  grad and vmap. Low-precision (bf16) inputs are accumulated in float32 and the output is
  cast back to `value.dtype`.

  Args:
    value: `[B, S, heads, C]`, S = sum_l H_l * W_l, levels concatenated in order, each level
      flattened row-major (y, x).
    spatial_shapes: static `((H_0, W_0), (H_1, W_1), ...)` python ints.
    sampling_locations: `[B, Q, heads, L, P, 2]` normalised (x, y); values outside [0, 1]
      are allowed (they blend in zero padding).
    attention_weights: `[B, Q, heads, L, P]` (normally softmax-ed over L * P by the caller).
    implementation: None (best for the current backend), "xla", "pallas_gpu" or
      "pallas_tpu".
    interpret: run Pallas kernels in interpret mode (for testing on CPU); ignored by "xla".

  Returns:
    `[B, Q, heads * C]` in `value.dtype`.

  Raises:
    ValueError: unknown implementation name, or inconsistent shapes.
    NotImplementedError: a known implementation that is not available yet.
  """
  if implementation is None:
    implementation = default_implementation()
  impl = IMPLEMENTATIONS.get(implementation)
  if impl is None:
    raise ValueError(
      f"unknown MSDA implementation {implementation!r}; expected None or one of "
      f"{tuple(IMPLEMENTATIONS)}"
    )
  if impl.fn is None:
    raise NotImplementedError(
      f"MSDA implementation {implementation!r} is not available yet; available: "
      f"{available_implementations()} (or None for the default)"
    )
  spatial_shapes = _static_spatial_shapes(spatial_shapes)
  _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
  return impl.fn(value, spatial_shapes, sampling_locations, attention_weights, interpret=interpret)
