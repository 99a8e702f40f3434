"""Panoptic annotations to the fixed-shape training targets of `mpformer_jax.targets.Targets`.

An image's annotation is a panoptic id map plus a list of segments (`id`, `category_id`,
`iscrowd`). `panoptic_to_targets` turns it into one int32 id map and `max_gt` slots; slot `j`'s
binary mask is `segment_ids == ids[j]` and id 0 is "no segment" (background of every mask).

Rules, in order:

1. Pixels whose id is not listed in `segments` (0 = void in COCO) map to 0.
2. Crowd segments are ignored in the panoptic and instance tasks: their pixels map to 0
   (Mask2Former's panoptic and instance mappers drop crowd regions). The semantic task keeps
   them as their class, as the reference's semantic labels do (detectron2's COCO semantic
   labels from panoptic annotations, Cityscapes' `labelTrainIds` for "group" regions).
3. Task selection: "panoptic" keeps every remaining segment; "instance" keeps thing segments
   only (stuff pixels map to 0); "semantic" merges all kept segments (stuff and things) of a
   class into one target whose id is `label + 1`.
4. Targets without pixels in this (cropped) map are removed and counted in `num_empty`; this is
   normal after random crops.
5. If more than `max_gt` targets remain, the `max_gt` largest (by pixel count, ties by order)
   are kept, in their original order; the others are counted in `num_dropped` and their pixels
   map to 0. The pipeline reports these counts; a growing `num_dropped` means `max_gt` is too
   small.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

TASKS = ("panoptic", "instance", "semantic")


def segments_as_arrays(segments) -> dict[str, np.ndarray]:
  """Segment metadata as `{"id", "category_id", "iscrowd"}` arrays of equal length `[S]`.

  Args:
    segments: a list of per-segment dicts, or a dict of sequences (TFDS' decoding of a
      `Sequence` feature).
  """
  if isinstance(segments, Mapping):
    columns = {k: segments[k] for k in ("id", "category_id", "iscrowd")}
  else:
    columns = {k: [s[k] for s in segments] for k in ("id", "category_id", "iscrowd")}
  return {
    "id": np.asarray(columns["id"], np.int64).reshape(-1),
    "category_id": np.asarray(columns["category_id"], np.int64).reshape(-1),
    "iscrowd": np.asarray(columns["iscrowd"], bool).reshape(-1),
  }


def panoptic_to_targets(
  pan_ids: np.ndarray,
  segments,
  task: str,
  max_gt: int,
  thing_category_ids: Sequence[int],
  category_to_label: Mapping[int, int],
) -> dict[str, np.ndarray]:
  """Fixed-shape targets of one image (rules in the module docstring).

  Args:
    pan_ids: int `[H, W]` panoptic segment id of every pixel.
    segments: the image's segments, as accepted by `segments_as_arrays`.
    task: "panoptic", "instance" or "semantic".
    max_gt: number of target slots.
    thing_category_ids: dataset category ids that are things.
    category_to_label: dataset category id -> contiguous training label in `[0, K)`.

  Returns:
    A dict of numpy arrays: `segment_ids` int32 `[H, W]`, `ids` int32 `[max_gt]` (>= 1 where
    valid, 0 elsewhere), `labels` int32 `[max_gt]` (0 where invalid), `valid` bool `[max_gt]`,
    `num_dropped` int32 `[]` and `num_empty` int32 `[]`.

  Raises:
    ValueError: for an unknown task, a kept segment whose category has no label, or segment ids
      that are repeated or < 1.
  """
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  seg = segments_as_arrays(segments)
  keep = np.ones_like(seg["iscrowd"]) if task == "semantic" else ~seg["iscrowd"]
  if task == "instance":
    keep &= np.isin(seg["category_id"], np.asarray(thing_category_ids, np.int64))
  # Only kept segments need a label (the instance task's label space has no stuff classes).
  unknown = sorted({int(c) for c in seg["category_id"][keep]} - set(category_to_label))
  if unknown:
    raise ValueError(f"segments use category ids {unknown} that have no training label")
  labels = np.array([category_to_label.get(int(c), -1) for c in seg["category_id"]], np.int64)

  # Each pixel's segment index (-1 when unlisted or not kept), through the map's distinct ids:
  # an image has few segments, so a dict lookup per distinct id is cheap.
  index_of = {int(i): k for k, i in enumerate(seg["id"])}
  if len(index_of) != len(seg["id"]) or np.any(seg["id"] <= 0):
    raise ValueError(f"segment ids must be unique and >= 1 (0 is void): {seg['id'].tolist()}")
  uniq, inverse = np.unique(np.asarray(pan_ids), return_inverse=True)
  inverse = inverse.reshape(np.shape(pan_ids))
  uniq_seg = np.array([index_of.get(int(u), -1) for u in uniq], np.int64)
  # Index -1 reads the appended False, so unlisted ids stay -1 (also when there are no segments).
  uniq_seg = np.where(np.append(keep, False)[uniq_seg], uniq_seg, -1)
  counts = np.bincount(inverse.ravel(), minlength=len(uniq))
  seg_area = np.zeros(len(seg["id"]), np.int64)
  seg_area[uniq_seg[uniq_seg >= 0]] = counts[uniq_seg >= 0]

  # Candidate targets: one per kept segment, or one per class for the semantic task.
  if task == "semantic":
    cand_label = np.unique(labels[keep])
    cand_area = np.array([seg_area[keep & (labels == c)].sum() for c in cand_label], np.int64)
    cand_id = cand_label + 1
    # Map each segment to its class's target id.
    seg_target = labels + 1
  else:
    cand_label, cand_area, cand_id = labels[keep], seg_area[keep], seg["id"][keep]
    seg_target = seg["id"]
  num_empty = int(np.sum(cand_area == 0))
  nonempty = cand_area > 0
  cand_label, cand_area, cand_id = cand_label[nonempty], cand_area[nonempty], cand_id[nonempty]

  num_dropped = max(len(cand_id) - max_gt, 0)
  if num_dropped:
    largest = np.argsort(-cand_area, kind="stable")[:max_gt]
    chosen = np.sort(largest)
    cand_label, cand_id = cand_label[chosen], cand_id[chosen]

  # Pixels of kept segments get their target id, unless that target was dropped.
  uniq_target = np.append(seg_target, 0)[uniq_seg]  # -1 (no kept segment) reads the 0
  uniq_target = np.where(np.isin(uniq_target, cand_id), uniq_target, 0)
  n = len(cand_id)
  out_ids = np.zeros(max_gt, np.int32)
  out_labels = np.zeros(max_gt, np.int32)
  out_ids[:n], out_labels[:n] = cand_id, cand_label
  return {
    "segment_ids": uniq_target.astype(np.int32)[inverse],
    "ids": out_ids,
    "labels": out_labels,
    "valid": np.arange(max_gt) < n,
    "num_dropped": np.int32(num_dropped),
    "num_empty": np.int32(num_empty),
  }
