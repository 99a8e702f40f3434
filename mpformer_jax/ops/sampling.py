"""Bilinear sampling and resizing with PyTorch semantics.

Mask2Former / MP-Former sample features in two ways that must match PyTorch exactly so that
converted checkpoints behave the same:

* `torch.nn.functional.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`
  at normalised points: in the deformable attention of the pixel decoder and in the point
  sampling of the mask loss (detectron2 `point_sample`). `linear_taps` / `bilinear_corners` are
  the shared core (also used by `mpformer_jax.ops.msda`); `point_sample` is the user-facing op.
* `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` (no antialiasing) to
  resize mask logits and features: `resize_bilinear` (NHWC) and `resize_bilinear_hw`
  (`[..., H, W]`, e.g. `[B, Q, H, W]` mask logits).

Conventions: normalised coordinates are (x, y) in [0, 1], x along the width. With
`align_corners=False` a normalised coordinate `u` maps to pixel `u * size - 0.5`, i.e. pixel
centres sit at `(i + 0.5) / size`. Pixels outside the map read as zero ("zeros" padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "LinearTaps",
  "bilinear_corners",
  "linear_taps",
  "point_sample",
  "resize_bilinear",
  "resize_bilinear_hw",
]


def _compute_dtype(dtype) -> jnp.dtype:
  """Float32 for low-precision inputs (bf16/f16), the input dtype otherwise (f32/f64)."""
  dtype = jnp.dtype(dtype)
  return jnp.promote_types(dtype, jnp.float32)


class LinearTaps(NamedTuple):
  """The two taps of 1-D linear interpolation at pixel coordinate x, with zero padding.

  Attributes:
    lo, hi: int32 indices floor(x) and floor(x) + 1, clamped into [0, size) so that reading
      them never goes out of bounds.
    w_lo, w_hi: their weights 1 - frac(x) and frac(x), set to 0 where the unclamped index is
      outside [0, size) (zero padding).
    valid_lo, valid_hi: whether the unclamped indices are inside [0, size). d w_lo / d x is
      `-valid_lo` and d w_hi / d x is `valid_hi` (floor has zero derivative).
  """

  lo: jax.Array
  hi: jax.Array
  w_lo: jax.Array
  w_hi: jax.Array
  valid_lo: jax.Array
  valid_hi: jax.Array


def linear_taps(x: jax.Array, size) -> LinearTaps:
  """Linear-interpolation taps of pixel coordinates `x` on an axis of length `size`.

  Args:
    x: `[...]` float pixel coordinates (pixel i covers [i - 0.5, i + 0.5]; for a normalised
      coordinate u with align_corners=False pass `u * size - 0.5`).
    size: axis length; a python int or an int array broadcastable to `x`.

  Returns:
    `LinearTaps` with arrays of `x`'s shape.
  """
  x_lo = jnp.floor(x)
  # frac carries the gradient w.r.t. x; floor() has zero derivative, as in PyTorch.
  frac = x - x_lo
  lo = x_lo.astype(jnp.int32)
  hi = lo + 1
  valid_lo = (lo >= 0) & (lo < size)
  valid_hi = (hi >= 0) & (hi < size)
  zero = jnp.zeros_like(frac)
  return LinearTaps(
    lo=jnp.clip(lo, 0, size - 1),
    hi=jnp.clip(hi, 0, size - 1),
    w_lo=jnp.where(valid_lo, 1 - frac, zero),
    w_hi=jnp.where(valid_hi, frac, zero),
    valid_lo=valid_lo,
    valid_hi=valid_hi,
  )


def bilinear_corners(x: jax.Array, y: jax.Array, height, width) -> tuple[jax.Array, jax.Array]:
  """Flat indices and weights of the 4 bilinear corners of pixel-space points.

  This is the gather form of `grid_sample(bilinear, zeros padding)`: the sample at (x, y) is
  `sum_k weight[..., k] * map_flat[index[..., k]]` where `map_flat` is the `[H * W]` row-major
  flattening of the map. Indices are clamped into the map so the gather never goes out of
  bounds; a corner outside the map gets weight 0 instead, which is exactly zero padding (and
  also gives a zero gradient w.r.t. the location through that corner, like PyTorch).

  Args:
    x: `[...]` pixel-space x (column) coordinates, already shifted: for a normalised `u` in
      [0, 1] pass `u * width - 0.5`. Floating point.
    y: `[...]` pixel-space y (row) coordinates, same shape/shift convention with `height`.
    height: map height; a python int or an integer array broadcastable to `x` (per-level
      heights for multi-scale maps).
    width: map width; same as `height`.

  Returns:
    index: `[..., 4]` int32 row-major flat indices `row * width + col` in `[0, H * W)`, corners
      ordered (top-left, top-right, bottom-left, bottom-right), i.e. `k = 2 * dy + dx`.
    weight: `[..., 4]` bilinear weights in `x`'s dtype, 0 for corners outside the map.
  """
  tx = linear_taps(x, width)
  ty = linear_taps(y, height)
  row_lo = ty.lo * width
  row_hi = ty.hi * width
  index = jnp.stack([row_lo + tx.lo, row_lo + tx.hi, row_hi + tx.lo, row_hi + tx.hi], axis=-1)
  weight = jnp.stack(
    [ty.w_lo * tx.w_lo, ty.w_lo * tx.w_hi, ty.w_hi * tx.w_lo, ty.w_hi * tx.w_hi], axis=-1
  )
  return index, weight


def point_sample(features: jax.Array, coords: jax.Array) -> jax.Array:
  """Bilinearly samples a feature map at normalised points (detectron2 `point_sample`).

  Equals `F.grid_sample(features_nchw, 2 * coords - 1, mode="bilinear", padding_mode="zeros",
  align_corners=False)` (with the point axis as a grid of width 1), in NHWC layout. In pixel
  units the sample of point (x, y) is taken at (x * W - 0.5, y * H - 0.5); points outside the
  map blend in zeros.

  For `[B, Q, H, W]` mask logits (channels-first, one channel per query) use
  `point_sample(masks.transpose(0, 2, 3, 1), coords)` for shared points, or
  `point_sample(masks.reshape(B * Q, H, W, 1), coords.reshape(B * Q, P, 2))[..., 0]` for
  per-mask points.

  Args:
    features: `[B, H, W, C]` feature map.
    coords: `[B, P, 2]` normalised (x, y) coordinates; [0, 1] covers the map edge to edge.

  Returns:
    `[B, P, C]` samples in `features.dtype` (accumulated in at least float32).
  """
  if features.ndim != 4 or coords.ndim != 3 or coords.shape[-1] != 2:
    raise ValueError(
      f"point_sample expects features [B, H, W, C] and coords [B, P, 2], got "
      f"{features.shape} and {coords.shape}"
    )
  batch, height, width, channels = features.shape
  ctype = _compute_dtype(jnp.result_type(features.dtype, coords.dtype))
  coords = coords.astype(ctype)
  index, weight = bilinear_corners(
    coords[..., 0] * width - 0.5, coords[..., 1] * height - 0.5, height, width
  )
  flat = features.reshape(batch, height * width, channels)
  # One gather per corner, summed: XLA fuses the 4 gathers and the blend into one loop fusion
  # instead of writing a [B, P, 4, C] gathered tensor first.
  out = None
  for k in range(4):
    corner = jnp.take_along_axis(
      flat, index[..., k, None], axis=1, mode="promise_in_bounds"
    )  # [B, P, C]
    term = corner.astype(ctype) * weight[..., k, None]
    out = term if out is None else out + term
  return out.astype(features.dtype)


def _source_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and lerp weights of PyTorch's bilinear resize along one axis.

  Mirrors ATen's `area_pixel_compute_source_index` (align_corners=False): output pixel `i`
  reads source coordinate `(i + 0.5) * in / out - 0.5`, clamped at 0 (not at the far edge,
  where the upper tap is clamped instead). The float32 scale and a single rounding of the
  source coordinate to float32 (ATen's CPU kernel evaluates it as one fused multiply-add)
  reproduce ATen's weights bit for bit; at source coordinates ~30 one float32 ulp is already
  ~2e-6, so the rounding order is visible in the output.

  Returns:
    lo, hi: `[out_size]` int32 source indices (`hi == lo` at the last source pixel).
    frac: `[out_size]` float32 weight of `hi` (`lo` gets `1 - frac`).
  """
  scale = np.float64(np.float32(in_size) / np.float32(out_size))
  # Exact in float64 (24-bit scale times a small half-integer), then rounded once.
  src = (scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  lo = np.minimum(src.astype(np.int32), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(np.float32)).astype(np.float32)
  return lo, hi, frac


def _resize_axis(x: jax.Array, axis: int, out_size: int, ctype) -> jax.Array:
  """Bilinear (align_corners=False) resize of one axis with two static gathers and a lerp."""
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  lo, hi, frac = _source_taps(in_size, out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  frac = jnp.asarray(frac, ctype).reshape(shape)
  a = jnp.take(x, lo, axis=axis, mode="clip").astype(ctype)
  b = jnp.take(x, hi, axis=axis, mode="clip").astype(ctype)
  # Same blend form as ATen, (1 - f) * a + f * b, for matching rounding.
  return (1 - frac) * a + frac * b


def _check_size(size: Sequence[int]) -> tuple[int, int]:
  if len(size) != 2:
    raise ValueError(f"size must be (height, width), got {size!r}")
  h, w = int(size[0]), int(size[1])
  if h <= 0 or w <= 0:
    raise ValueError(f"size must be positive, got {size!r}")
  return h, w


def resize_bilinear_hw(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinearly resizes the last two axes, like `F.interpolate(bilinear, align_corners=False)`.

  Use this for channels-first tensors such as `[B, Q, H, W]` mask logits. No antialiasing is
  applied when downsampling (unlike `jax.image.resize`), matching PyTorch's default.

  Args:
    x: `[..., H, W]` array.
    size: output `(h, w)` as python ints.

  Returns:
    `[..., h, w]` array in `x.dtype` (interpolated in at least float32).
  """
  if x.ndim < 2:
    raise ValueError(f"resize_bilinear_hw expects [..., H, W], got shape {x.shape}")
  h, w = _check_size(size)
  ctype = _compute_dtype(x.dtype)
  # Separable: rows, then columns (the result depends on the order only at the 1-ulp level).
  out = _resize_axis(x, x.ndim - 2, h, ctype)
  out = _resize_axis(out, x.ndim - 1, w, ctype)
  return out.astype(x.dtype)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinearly resizes an NHWC map, like `F.interpolate(bilinear, align_corners=False)`.

  Works for up- and downsampling with arbitrary (non-integer) ratios; no antialiasing.

  Args:
    x: `[B, H, W, C]` array (any number of leading axes before `H, W, C` is accepted).
    size: output `(h, w)` as python ints.

  Returns:
    `[B, h, w, C]` array in `x.dtype` (interpolated in at least float32).
  """
  if x.ndim < 3:
    raise ValueError(f"resize_bilinear expects [..., H, W, C], got shape {x.shape}")
  h, w = _check_size(size)
  ctype = _compute_dtype(x.dtype)
  out = _resize_axis(x, x.ndim - 3, h, ctype)
  out = _resize_axis(out, x.ndim - 2, w, ctype)
  return out.astype(x.dtype)
