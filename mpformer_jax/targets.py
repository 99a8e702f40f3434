"""Compact, fixed-shape ground truth and the mask operations built from it on device.

Segmentation ground truth arrives as one segment-id map per image plus, for each of up to
`max_gt` segments, its id, class and a validity bit. The binary mask of segment `j` is
`segment_ids == ids[j]`; it is never stored as a `[B, max_gt, H, W]` tensor. What the model and
the losses need is derived from the map directly:

- `sample_masks`: the masks bilinearly point-sampled at arbitrary points (detectron2
  `point_sample` of the float mask), for the matcher and the point losses;
- `area_pooled_masks`: the "any pixel" area pooling of MP-Former's GT attention masks.

Id 0 is "no segment" (void, ignore, padding): it belongs to no mask, as in the reference, where
ignored and padded pixels are background of every mask.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from mpformer_jax.ops.sampling import bilinear_corners


@flax.struct.dataclass
class Targets:
  """Ground truth of a batch, padded to fixed shapes.

  Attributes:
    segment_ids: int32 `[B, H, W]` segment id of every pixel of the (padded) image; 0 = none.
    ids: int32 `[B, M]` id of each segment slot (>= 1 where valid).
    labels: int32 `[B, M]` class of each slot in `[0, K)` (anything where invalid).
    valid: bool `[B, M]` which slots hold a segment.
  """

  segment_ids: jax.Array
  ids: jax.Array
  labels: jax.Array
  valid: jax.Array

  @property
  def max_gt(self) -> int:
    return self.ids.shape[1]


def sample_masks(targets: Targets, coords: jax.Array, slots: jax.Array | None = None) -> jax.Array:
  """Binary GT masks bilinearly sampled at normalised points.

  Equals `point_sample(masks.float(), coords)` of the full-resolution binary masks (bilinear,
  zero padding, align_corners=False), so values are fractional at segment boundaries. Only the
  4 corner ids of each point are gathered; no mask is materialised.

  Args:
    targets: the batch's `Targets` (`segment_ids` `[B, H, W]`).
    coords: `[B, P, 2]` normalised (x, y) in [0, 1], shared by all segments of an image, or
      `[B, M, P, 2]` per segment (`[B, N, P, 2]` per row with `slots`).
    slots: optional int `[B, N]`: row `n` of image `b` is the mask of GT slot `slots[b, n]`
      (rows in any order, slots repeated or left out). Default: the `M` slots in order.

  Returns:
    float32 `[B, M, P]` (`[B, N, P]` with `slots`); zero for invalid slots.
  """
  b, h, w = targets.segment_ids.shape
  flat_ids = targets.segment_ids.reshape(b, h * w)
  shared = coords.ndim == 3
  x = coords[..., 0].astype(jnp.float32) * w - 0.5
  y = coords[..., 1].astype(jnp.float32) * h - 0.5
  index, weight = bilinear_corners(x, y, h, w)  # [B, (M,) P, 4]
  corner_ids = jnp.take_along_axis(
    flat_ids, index.reshape(b, -1), axis=1, mode="promise_in_bounds"
  ).reshape(index.shape)
  ids = jnp.where(targets.valid, targets.ids, -1)  # invalid slots match nothing
  if slots is not None:
    ids = jnp.take_along_axis(ids, slots, axis=1)
  if shared:
    hit = corner_ids[:, None] == ids[:, :, None, None]  # [B, M, P, 4]
    return jnp.sum(jnp.where(hit, weight[:, None], 0.0), axis=-1)
  hit = corner_ids == ids[:, :, None, None]
  return jnp.sum(jnp.where(hit, weight, 0.0), axis=-1)


def area_pooled_masks(targets: Targets, sizes: tuple[tuple[int, int], ...]) -> list[jax.Array]:
  """Which cells of each level contain at least one pixel of each segment.

  MP-Former resizes GT masks to a level with `F.interpolate(mode="area")` and keeps cells with a
  pooled value above 1e-8 (spec section 1.4): a cell is attendable when any pixel of the segment
  falls inside it. The image size is a multiple of every level's stride, so cells are exact
  `s x s` blocks. The finest level is computed from the id map; coarser levels OR-pool it, which
  is the same "any pixel" rule.

  Args:
    targets: the batch's `Targets`.
    sizes: `(h, w)` of each level, in any order; each must divide the image size.

  Returns:
    One bool `[B, M, h, w]` per entry of `sizes` (True = the segment touches the cell; False for
    invalid slots).
  """
  b, h, w = targets.segment_ids.shape
  for size in sizes:
    if h % size[0] or w % size[1]:
      raise ValueError(f"level size {size} does not divide the image size {(h, w)}")
  finest = max(sizes, key=lambda s: s[0] * s[1])
  fh, fw = finest
  sy, sx = h // fh, w // fw
  blocks = targets.segment_ids.reshape(b, fh, sy, fw, sx)
  ids = jnp.where(targets.valid, targets.ids, -1)
  # [B, M, fh, fw]: XLA fuses the comparison into the reduction, so the [B, M, H, W] comparison
  # is never materialised.
  fine = jnp.any(blocks[:, None] == ids[:, :, None, None, None, None], axis=(3, 5))
  out = []
  for sh, sw in sizes:
    ry, rx = fh // sh, fw // sw
    out.append(fine.reshape(b, fine.shape[1], sh, ry, sw, rx).any(axis=(3, 5)))
  return out
