"""Inference post-processing (detectron2 Mask2Former `maskformer_model.py`, spec section 5).

Everything here is jit-able with static output shapes, so one compilation serves every batch:
per-example sizes are traced values, and variable-length results (segments, instances) become
fixed-size arrays with a validity flag or a sentinel value.

Pipeline (the reference's order):

1. `upsample_masks`: mask logits `[B, Q, H/4, W/4]` -> padded input size `[B, Q, H, W]`.
2. `resize_to_original`: detectron2's `sem_seg_postprocess` per example (crop to the unpadded
   size, resize to the original image size) on the mask *logits*, into a fixed canvas.
3. `semantic_inference` / `semantic_segmentation`, `panoptic_inference` (+ the host helper
   `panoptic_segments_info`) and `instance_inference`.

Matching the reference's variable-length outputs:

- Panoptic: the reference numbers its segments 1, 2, 3, ... in order of appearance. Here a
  segment's id is the index + 1 of the query that opened it (the first passing query of a merged
  stuff class), so ids live in 1..Q and `segment_labels[b, q]` describes id `q + 1` (-1 when the
  id is unused). The partition and the class of every segment are identical; only the ids
  differ, and `panoptic_segments_info` renumbers them to the reference's 1..n (query order ==
  order of appearance, since the reference also walks the kept queries in query order).
- Instance: the reference keeps `top_k` (query, class) pairs and, when panoptic is on, then
  drops those whose class is not a thing class, so it returns fewer than `top_k`. Here those
  entries stay in place with `valid = False` and score `-inf`; taking the valid entries gives the
  reference's list (the reference's `topk(sorted=False)` order is unspecified; ours is by
  decreasing class score).

Differences from Hugging Face (`Mask2FormerImageProcessor[Pil].post_process_*`, transformers 5):

- All: HF first resizes the mask logits to a hard-coded 384x384, whatever the input size.
- Semantic: with `target_sizes` HF resizes the per-class probabilities (after the softmax/sigmoid
  einsum); the reference resizes the mask logits and applies the einsum afterwards.
- Panoptic:
  - HF's segment is `argmax == k`; the reference's is `(argmax == k) & (sigmoid_k >= 0.5)`, so a
    pixel whose winning query has sigmoid < 0.5 is void in the reference, and the reference also
    skips a query when that intersection is empty.
  - HF multiplies the probabilities by the class score in place before computing the original
    area, so its `original_area` is `#(score * sigmoid >= 0.5)`; the reference's is
    `#(sigmoid >= 0.5)`.
  - HF skips when `area_ratio <= threshold`, the ratio being a float32 tensor; the reference
    skips when `ratio < threshold` in float64. They differ only at (float32) equality: an exact
    3/4 is dropped by HF at 0.75, kept by the reference; float32(4/5) > 0.8, so both keep 4/5.
  - HF fuses the classes in `label_ids_to_fuse`; the reference fuses every non-thing class.
  - HF resets its running segment id to the fused segment's id when it fuses, so a new segment
    after a fused stuff query can reuse an existing id (merging unrelated segments); HF also
    lists fused segments once per query. The reference does neither.
  - HF's default `threshold` is 0.5 (the reference's is 0.8); with no kept query HF returns an
    all -1 map, the reference an all-void (0) map. With `target_sizes` HF resizes the
    probabilities, the reference the logits (before `sem_seg_postprocess`).
- Instance: HF keeps `num_queries` pairs (the reference `TEST.DETECTIONS_PER_IMAGE = 100`), drops
  results with score < `threshold` (default 0.5) and those with an empty binary mask (the
  reference keeps all of them), has no thing-only filter, and resizes the *binary* masks with
  nearest interpolation to `target_sizes` (the reference thresholds logits already resized
  bilinearly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_HIGHEST = jax.lax.Precision.HIGHEST


def _interp_matrix(in_size: jax.Array, out_size: jax.Array, in_dim: int, out_dim: int):
  """One axis of torch's bilinear `align_corners=False` resize as a dense matrix.

  `_interp_taps`' two taps per output row, written into `[out_dim, in_dim]` rows.

  Args:
    in_size: `[...]` int, the used input length (<= `in_dim`; later input rows get no weight,
      which is the crop).
    out_size: `[...]` int, the output length (<= `out_dim`; later output rows are all zero).
    in_dim: static input axis length.
    out_dim: static output axis length.

  Returns:
    `[..., out_dim, in_dim]` float32 weights.
  """
  i0, i1, w0, w1 = _interp_taps(in_size, out_size, out_dim)
  # i0 == i1 at the last input row: the two one-hots then add up to weight w0 + w1 = 1.
  return w0[..., None] * jax.nn.one_hot(i0, in_dim, dtype=jnp.float32) + w1[
    ..., None
  ] * jax.nn.one_hot(i1, in_dim, dtype=jnp.float32)


def upsample_masks(mask_logits: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize (torch `F.interpolate(mode="bilinear", align_corners=False)`).

  No antialiasing (unlike `jax.image.resize` when downsampling), like torch.

  Args:
    mask_logits: `[B, Q, h, w]`.
    size: static `(H, W)`, typically the padded input size.

  Returns:
    `[B, Q, H, W]` float32.
  """
  h, w = mask_logits.shape[-2:]
  out_h, out_w = size
  rows = _interp_matrix(h, out_h, h, out_h)  # [H, h]
  cols = _interp_matrix(w, out_w, w, out_w)  # [W, w]
  x = mask_logits.astype(jnp.float32)
  x = jnp.einsum("bqhw,jw->bqhj", x, cols, precision=_HIGHEST)
  return jnp.einsum("ih,bqhj->bqij", rows, x, precision=_HIGHEST)


def _interp_taps(in_size: jax.Array, out_size: jax.Array, out_dim: int):
  """One axis of torch's bilinear `align_corners=False` resize as two taps per output row.

  Reproduces ATen's `area_pixel_compute_source_index` / `compute_source_index_and_lambda` in
  float32: `src = max((in / out) * (i + 0.5) - 0.5, 0)`, `i0 = min(floor(src), in - 1)`,
  `i1 = i0 + (i0 < in - 1)`, `w1 = clip(src - i0, 0, 1)`, `w0 = 1 - w1`. Kept as indices and
  weights, a resize costs O(output) (`resize_to_original`); `_interp_matrix` makes the dense
  form.

  Args:
    in_size: `[...]` int, the used input length (the crop).
    out_size: `[...]` int, the output length (<= `out_dim`; later rows get zero weights).
    out_dim: static output axis length.

  Returns:
    `(i0, i1, w0, w1)`, each `[..., out_dim]` (int32 indices, float32 weights).
  """
  in_size = jnp.maximum(jnp.asarray(in_size, jnp.int32), 1)[..., None]
  out_size = jnp.asarray(out_size, jnp.int32)[..., None]
  # torch: static_cast<float>(input_size) / output_size, in float32.
  scale = in_size.astype(jnp.float32) / jnp.maximum(out_size, 1).astype(jnp.float32)
  dst = jnp.arange(out_dim, dtype=jnp.float32)
  src = jnp.maximum(scale * (dst + 0.5) - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  i1 = i0 + (i0 < in_size - 1).astype(jnp.int32)
  w1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
  rows = jnp.arange(out_dim) < out_size
  return i0, i1, jnp.where(rows, 1.0 - w1, 0.0), jnp.where(rows, w1, 0.0)


def resize_to_original(
  x: jax.Array,
  resized_size: jax.Array,
  image_size: jax.Array,
  out_size: tuple[int, int],
) -> tuple[jax.Array, jax.Array]:
  """detectron2's `sem_seg_postprocess` per example, into a fixed canvas.

  Example `b` equals `F.interpolate(x[b:b+1, :, :rh, :rw], size=(oh, ow), mode="bilinear",
  align_corners=False)` written at the top-left of a zero `[C, Ho, Wo]` canvas, with
  `(rh, rw) = resized_size[b]` and `(oh, ow) = image_size[b]`. Each output pixel mixes two
  gathered rows and two gathered columns (width first, as ATen's kernel), with indices and
  weights computed on device from the traced sizes: the cost is that of the output.

  Args:
    x: `[B, C, H, W]` at the padded input size: mask logits (panoptic and instance runs) or
      per-class scores (semantic runs, as the reference post-processes those).
    resized_size: `int[B, 2]` (height, width) the image occupies in the padded input.
    image_size: `int[B, 2]` original (height, width); each must fit in `out_size`.
    out_size: static canvas `(Ho, Wo)`.

  Returns:
    `(x [B, C, Ho, Wo] float32, valid [B, Ho, Wo] bool)`; `x` is 0 outside `valid`.
  """
  out_h, out_w = out_size
  resized_size = jnp.asarray(resized_size, jnp.int32)
  image_size = jnp.asarray(image_size, jnp.int32)
  x = x.astype(jnp.float32)
  valid = (jnp.arange(out_h)[None, :, None] < image_size[:, 0, None, None]) & (
    jnp.arange(out_w)[None, None, :] < image_size[:, 1, None, None]
  )
  if x.shape[-2:] == (out_h, out_w):
    # Images kept at their size (synthetic data, Cityscapes): the resize is the identity (unit
    # scale: weights 1 and 0) and only the crop remains, so skip the gathers for such batches.
    return lax.cond(
      jnp.all(resized_size == image_size),
      lambda x: jnp.where(valid[:, None], x, 0.0),
      lambda x: _resize_to_original(x, resized_size, image_size, out_size),
      x,
    ), valid
  return _resize_to_original(x, resized_size, image_size, out_size), valid


def _resize_to_original(x, resized_size, image_size, out_size):
  """`resize_to_original`'s crop and resize: `[B, C, Ho, Wo]`, 0 outside each image."""
  out_h, out_w = out_size
  c0, c1, v0, v1 = _interp_taps(resized_size[:, 1], image_size[:, 1], out_w)  # [B, Wo]

  def columns(index):
    return jnp.take_along_axis(x, index[:, None, None, :], axis=3)

  x = v0[:, None, None, :] * columns(c0) + v1[:, None, None, :] * columns(c1)  # [B, C, H, Wo]
  r0, r1, u0, u1 = _interp_taps(resized_size[:, 0], image_size[:, 0], out_h)  # [B, Ho]

  def rows(index):
    return jnp.take_along_axis(x, index[:, None, :, None], axis=2)

  return u0[:, None, :, None] * rows(r0) + u1[:, None, :, None] * rows(r1)  # [B, C, Ho, Wo]


def semantic_inference(pred_logits: jax.Array, mask_logits: jax.Array) -> jax.Array:
  """Per-class scores `einsum("qk,qhw->khw", softmax(cls)[..., :-1], sigmoid(mask))`.

  Args:
    pred_logits: `[B, Q, K + 1]` class logits (last = no object).
    mask_logits: `[B, Q, H, W]`.

  Returns:
    `[B, K, H, W]` float32.
  """
  cls = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)[..., :-1]
  masks = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
  return jnp.einsum("bqk,bqhw->bkhw", cls, masks, precision=_HIGHEST)


def semantic_segmentation(
  pred_logits: jax.Array,
  mask_logits: jax.Array,
  valid_pixels: jax.Array | None = None,
  fill_value: int = -1,
) -> jax.Array:
  """Label map: argmax over classes of `semantic_inference` (first maximum on ties).

  Args:
    pred_logits: `[B, Q, K + 1]`.
    mask_logits: `[B, Q, H, W]`.
    valid_pixels: optional `bool[B, H, W]`; other pixels get `fill_value`.
    fill_value: label for pixels outside `valid_pixels`.

  Returns:
    `int32[B, H, W]`.
  """
  labels = jnp.argmax(semantic_inference(pred_logits, mask_logits), axis=1).astype(jnp.int32)
  if valid_pixels is not None:
    labels = jnp.where(valid_pixels, labels, jnp.int32(fill_value))
  return labels


class PanopticOutput(NamedTuple):
  """Fixed-shape panoptic result; segment id `q + 1` belongs to query `q`.

  Attributes:
    segment_map: `int32[B, H, W]`, 0 = void, else a segment id in 1..Q.
    segment_labels: `int32[B, Q]`, class of segment id `q + 1`, -1 if that id is unused.
    segment_scores: `float32[B, Q]`, class score of the query that opened the segment (0 if
      unused).
    segment_isthing: `bool[B, Q]`, whether the segment's class is a thing (False if unused).
  """

  segment_map: jax.Array
  segment_labels: jax.Array
  segment_scores: jax.Array
  segment_isthing: jax.Array


def panoptic_inference(
  pred_logits: jax.Array,
  mask_logits: jax.Array,
  isthing: jax.Array,
  object_mask_threshold: float = 0.8,
  overlap_threshold: float = 0.8,
  valid_pixels: jax.Array | None = None,
) -> PanopticOutput:
  """The reference's `panoptic_inference`, vectorised over queries and batched.

  Reference (per image): keep queries with `label != K` and `score > object_mask_threshold`;
  `ids = argmax_q score_q * sigmoid_q` over the kept queries; walking the kept queries in order,
  query `k` is skipped if `#(ids == k)`, `#(sigmoid_k >= 0.5)` or
  `#((ids == k) & (sigmoid_k >= 0.5))` is 0, or `#(ids == k) / #(sigmoid_k >= 0.5) <
  overlap_threshold`; otherwise its pixels `(ids == k) & (sigmoid_k >= 0.5)` get a new segment,
  except a stuff query whose class already has a segment, which paints into that segment.

  The walk has no sequential dependency beyond "first passing query of each stuff class", since
  the per-query pixel sets are disjoint (they are argmax classes), so it vectorises exactly.

  Args:
    pred_logits: `[B, Q, K + 1]` class logits.
    mask_logits: `[B, Q, H, W]` mask logits at the output resolution.
    isthing: `bool[K]`, thing classes (the others are stuff and merged per class).
    object_mask_threshold: class score threshold (strict `>`).
    overlap_threshold: minimum `mask_area / original_area`.
    valid_pixels: optional `bool[B, H, W]`: the image region of a padded canvas. Other pixels
      are void and do not count in any area (the reference works on the exact image size).

  Returns:
    `PanopticOutput`.
  """
  num_queries = pred_logits.shape[1]
  num_classes = pred_logits.shape[-1] - 1
  probs = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)
  scores = jnp.max(probs, axis=-1)  # [B, Q]
  # torch's max(-1) returns the first maximal index, as jnp.argmax does.
  labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  keep = (labels != num_classes) & (scores > object_mask_threshold)

  sig = jax.nn.sigmoid(mask_logits.astype(jnp.float32))  # [B, Q, H, W]
  # Non-kept queries take no part in the argmax; with none kept, every query passes no test
  # below, so the whole image is void (the reference's early return).
  prob = jnp.where(keep[:, :, None, None], scores[:, :, None, None] * sig, -jnp.inf)
  ids = jnp.argmax(prob, axis=1).astype(jnp.int32)  # [B, H, W]

  fg = sig >= 0.5  # [B, Q, H, W]
  if valid_pixels is None:
    valid_pixels = jnp.ones(ids.shape, bool)
  query_iota = jnp.arange(num_queries, dtype=jnp.int32)
  owned = (ids[:, None] == query_iota[None, :, None, None]) & valid_pixels[:, None]
  fg = fg & valid_pixels[:, None]
  mask_area = jnp.sum(owned, axis=(2, 3), dtype=jnp.int32)
  orig_area = jnp.sum(fg, axis=(2, 3), dtype=jnp.int32)
  inter_area = jnp.sum(owned & fg, axis=(2, 3), dtype=jnp.int32)
  # The reference divides Python ints (float64). float32 gives the same decision unless a / b is
  # within half a float32 ulp of the threshold without equalling it: for the default 0.8,
  # |a / b - 0.8| >= 0.2 / b, so only when orig_area exceeds ~1e7 pixels.
  ratio = mask_area.astype(jnp.float32) / jnp.maximum(orig_area, 1).astype(jnp.float32)
  passed = (
    keep
    & (mask_area > 0)
    & (orig_area > 0)
    & (inter_area > 0)
    & jnp.logical_not(ratio < overlap_threshold)
  )

  # Stuff merging: a passing stuff query paints into the segment of the first passing query of
  # the same class (itself if it is the first).
  isthing = jnp.asarray(isthing, bool)
  query_isthing = isthing[jnp.clip(labels, 0, num_classes - 1)]
  same_stuff = (
    passed[:, :, None]
    & passed[:, None, :]
    & (labels[:, :, None] == labels[:, None, :])
    & ~query_isthing[:, :, None]
  )  # [B, k, j]
  owner = jnp.where(
    query_isthing, query_iota[None], jnp.argmax(same_stuff, axis=-1).astype(jnp.int32)
  )
  query_segment = jnp.where(passed, owner + 1, 0)  # [B, Q]

  pixel_segment = jnp.take_along_axis(query_segment, ids.reshape(ids.shape[0], -1), axis=1)
  pixel_segment = pixel_segment.reshape(ids.shape)
  pixel_fg = jnp.take_along_axis(fg, ids[:, None], axis=1)[:, 0]
  segment_map = jnp.where(pixel_fg, pixel_segment, 0).astype(jnp.int32)

  opens = passed & (owner == query_iota[None])
  return PanopticOutput(
    segment_map=segment_map,
    segment_labels=jnp.where(opens, labels, -1).astype(jnp.int32),
    segment_scores=jnp.where(opens, scores, 0.0),
    segment_isthing=opens & query_isthing,
  )


def panoptic_segments_info(
  segment_map: np.ndarray,
  segment_labels: np.ndarray,
  segment_scores: np.ndarray,
  label_isthing: np.ndarray | Sequence[bool],
  label_to_category_id: Mapping[int, int] | Sequence[int] | None = None,
  image_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, list[dict]]:
  """Host helper: one image's `PanopticOutput` -> the reference's `(panoptic_seg, segments_info)`.

  Renumbers the used segment ids to 1..n in query order, which is the reference's numbering.

  Args:
    segment_map: `int[H, W]` (one image of `PanopticOutput.segment_map`).
    segment_labels: `int[Q]`.
    segment_scores: `float[Q]`.
    label_isthing: `bool[K]`.
    label_to_category_id: optional contiguous label -> dataset category id (e.g. for
      `pq_compute`); default keeps the contiguous label, like the reference's `segments_info`.
    image_size: optional `(h, w)` to crop the map to (the image region of a padded canvas).

  Returns:
    `(int32[h, w] map with ids 1..n and 0 = void, [{"id", "category_id", "isthing", "score",
    "label", "area"}, ...])` in id order.
  """
  segment_map = np.asarray(segment_map)
  if image_size is not None:
    segment_map = segment_map[: image_size[0], : image_size[1]]
  segment_labels = np.asarray(segment_labels)
  segment_scores = np.asarray(segment_scores)
  label_isthing = np.asarray(label_isthing, bool)
  lookup = np.zeros(segment_labels.shape[0] + 1, np.int32)
  infos = []
  for q in np.flatnonzero(segment_labels >= 0):
    new_id = len(infos) + 1
    lookup[q + 1] = new_id
    label = int(segment_labels[q])
    category = label if label_to_category_id is None else int(label_to_category_id[label])
    infos.append(
      {
        "id": new_id,
        "category_id": category,
        "isthing": bool(label_isthing[label]),
        "score": float(segment_scores[q]),
        "label": label,
      }
    )
  renumbered = lookup[segment_map]
  areas = np.bincount(renumbered.ravel(), minlength=len(infos) + 1)
  for info in infos:
    info["area"] = int(areas[info["id"]])
  return renumbered, infos


class InstanceOutput(NamedTuple):
  """Fixed-shape instance result.

  Attributes:
    scores: `float32[B, top_k]`, class score x mask score; `-inf` where not `valid`.
    labels: `int32[B, top_k]` contiguous class ids.
    masks: `bool[B, top_k, H, W]` (`logit > 0`).
    valid: `bool[B, top_k]`; False for entries the reference drops (non-thing classes when
      `thing_only_labels` is given).
    query: `int32[B, top_k]` the query each result comes from.
  """

  scores: jax.Array
  labels: jax.Array
  masks: jax.Array
  valid: jax.Array
  query: jax.Array


def instance_inference(
  pred_logits: jax.Array,
  mask_logits: jax.Array,
  num_classes: int,
  top_k: int = 100,
  thing_only_labels: jax.Array | None = None,
  valid_pixels: jax.Array | None = None,
) -> InstanceOutput:
  """The reference's `instance_inference`, batched.

  Class scores `softmax(cls)[:, :-1]` are flattened over `Q x K`, the `top_k` best (query,
  class) pairs are kept (`query = index // K`, `label = index % K`), `mask = logit > 0`,
  `mask_score = sum(sigmoid * mask) / (sum(mask) + 1e-6)` and `score = class_score *
  mask_score`.

  Args:
    pred_logits: `[B, Q, K + 1]`.
    mask_logits: `[B, Q, H, W]` at the output resolution.
    num_classes: K.
    top_k: results per image (`TEST.DETECTIONS_PER_IMAGE`, 100); clamped to `Q * K`.
    thing_only_labels: optional `bool[K]`: when given (panoptic on), results of other classes
      are marked invalid after the top-k, like the reference's removal.
    valid_pixels: optional `bool[B, H, W]`: pixels outside are never in a mask (they would not
      exist at the reference's exact image size).

  Returns:
    `InstanceOutput`, sorted by decreasing class score (ties: lower index first).
  """
  batch, num_queries = pred_logits.shape[:2]
  if pred_logits.shape[-1] != num_classes + 1:
    raise ValueError(f"pred_logits has {pred_logits.shape[-1]} classes, expected {num_classes}+1")
  top_k = min(top_k, num_queries * num_classes)
  cls = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)[..., :-1]
  class_scores, index = jax.lax.top_k(cls.reshape(batch, -1), top_k)
  query = (index // num_classes).astype(jnp.int32)
  labels = (index % num_classes).astype(jnp.int32)

  logits = mask_logits.astype(jnp.float32)
  masks = logits > 0
  if valid_pixels is not None:
    masks = masks & valid_pixels[:, None]
  # Per query, then gathered: the same numbers as the reference's per-result computation.
  fmask = masks.astype(jnp.float32)
  mask_scores = jnp.sum(jax.nn.sigmoid(logits) * fmask, axis=(2, 3)) / (
    jnp.sum(fmask, axis=(2, 3)) + 1e-6
  )
  scores = class_scores * jnp.take_along_axis(mask_scores, query, axis=1)
  result_masks = jnp.take_along_axis(masks, query[:, :, None, None], axis=1)

  if thing_only_labels is None:
    valid = jnp.ones(labels.shape, bool)
  else:
    valid = jnp.asarray(thing_only_labels, bool)[labels]
  return InstanceOutput(
    scores=jnp.where(valid, scores, -jnp.inf),
    labels=labels,
    masks=result_masks,
    valid=valid,
    query=query,
  )
