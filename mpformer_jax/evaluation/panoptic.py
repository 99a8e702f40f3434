"""Panoptic quality (PQ, SQ, RQ) of panoptic segmentations under the COCO panoptic rules.

A panoptic segmentation of an image is a segment-id map `int[H, W]` plus its `segments_info`, a
list of `{"id", "category_id", "iscrowd"}` dicts, one per segment. For every image:

- Id 0 is void. Ground-truth pixels with id 0 are void: predicted pixels falling on them are
  removed from the union of every pair and make up an "ignored" part of the prediction. Predicted
  pixels with id 0 are unlabelled: they belong to no predicted segment.
- Ground-truth segments with `iscrowd` set are never matched and never false negatives.
- A predicted and a ground-truth segment of the same category match when
  `IoU = |P & G| / (|P| + |G| - |P & G| - |P & void|) > 0.5` (strictly; decided with integer
  arithmetic, so IoU exactly 0.5 never matches). Above 0.5 a match is necessarily unique.
- An unmatched ground-truth segment is a false negative. An unmatched prediction is a false
  positive unless strictly more than half of its pixels lie on void or on crowd regions of its
  own category.
- Per category: `PQ = sum IoU(tp) / (tp + fp/2 + fn/2)`, `SQ = sum IoU(tp) / tp`,
  `RQ = tp / (tp + fp/2 + fn/2)`, each 0 when its denominator is 0. Group values (all, things,
  stuff) are means over the categories of the group with `tp + fp + fn > 0`; `n` is their count.

Where the reference tool (`panopticapi`) is silent or lenient this module decides as follows:

- A group (things or stuff) with no category present reports PQ = SQ = RQ = 0 with n = 0.
- Several crowd segments of one category in one image are united (the reference only keeps the
  last one listed).
- A ground-truth segment listed in `segments_info` but absent from its map has area 0 and is a
  false negative (unless crowd), as in the reference.
- A predicted segment listed but absent from its map, a non-zero id present in a map (predicted or
  ground-truth) but not listed, a listed id <= 0, a repeated id, a category id not in
  `categories` and maps of different shapes are all errors (`ValueError`, naming the image index
  and the ids). In particular unlisted ground-truth ids are not silently treated as void (the
  reference neither matches them nor counts them as void): a map and a list that disagree point
  at a data bug, so this module refuses them.
- `iscrowd` may be missing (read as 0); it is ignored on predictions.
- `per_class` has an entry for every category, zeros for those never present; its `"iou"` is the
  sum of the IoUs of the true positives (the only entry not in [0, 1]).

The per-image work is one `np.unique` over int64 pair codes `gt_id * K + pred_id` (`K` = largest
predicted id + 1), from which the intersection table and all areas follow. Ids up to 2^31 (e.g.
RGB-encoded `R + 256 G + 256^2 B`) fit directly; larger ids are first compacted.
`PanopticQuality` accumulates the counts image by image so that evaluation can stream images;
`merge` gathers accumulators from several processes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

VOID = 0
_INT64_MAX = int(np.iinfo(np.int64).max)

Segments = Sequence[Mapping[str, Any]]


@dataclasses.dataclass
class ClassCounts:
  """Matching counts of one category, summed over images.

  Attributes:
    tp: matched pairs.
    fp: unmatched, not ignored predictions.
    fn: unmatched, non-crowd ground-truth segments.
    iou: sum of the IoUs of the matched pairs.
  """

  tp: int = 0
  fp: int = 0
  fn: int = 0
  iou: float = 0.0

  def add(self, other: ClassCounts) -> None:
    self.tp += other.tp
    self.fp += other.fp
    self.fn += other.fn
    self.iou += other.iou


def _fmt_ids(ids: Iterable[int], limit: int = 10) -> str:
  ids = sorted(ids)
  head = ", ".join(str(i) for i in ids[:limit])
  return head + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _check_map(segment_map: Any, image: int, kind: str) -> np.ndarray:
  """Validates a segment-id map and returns it as int64 `[H, W]`."""
  arr = np.asarray(segment_map)
  if arr.ndim != 2:
    raise ValueError(f"image {image}: {kind} map must be 2-D [H, W], got shape {arr.shape}")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"image {image}: {kind} map must hold integer ids, got dtype {arr.dtype}")
  if arr.size:
    # Checked before the int64 cast, which would wrap huge uint64 ids to negative ones.
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
      raise ValueError(f"image {image}: {kind} map holds negative id {lo}")
    if hi > _INT64_MAX:
      raise ValueError(f"image {image}: {kind} map holds id {hi} beyond int64")
  return arr.astype(np.int64, copy=False)


def _parse_segments(
  segments: Segments, image: int, kind: str
) -> tuple[dict[int, int], dict[int, bool]]:
  """Returns `{id: category_id}` and `{id: iscrowd}` of one image's `segments_info`."""
  cats: dict[int, int] = {}
  crowd: dict[int, bool] = {}
  for seg in segments:
    try:
      sid, cat = int(seg["id"]), int(seg["category_id"])
    except KeyError as e:
      raise ValueError(f"image {image}: {kind} segment {seg!r} lacks key {e}") from None
    if sid <= VOID:
      raise ValueError(f"image {image}: {kind} segment id {sid} is not positive (0 is void)")
    if sid in cats:
      raise ValueError(f"image {image}: {kind} segment id {sid} is listed twice")
    cats[sid] = cat
    crowd[sid] = bool(seg.get("iscrowd", 0))
  return cats, crowd


def _parse_categories(categories: Sequence[Mapping[str, Any]]) -> dict[int, bool]:
  """Returns `{category_id: isthing}` in the given order."""
  out: dict[int, bool] = {}
  for cat in categories:
    try:
      cid, isthing = int(cat["id"]), bool(cat["isthing"])
    except KeyError as e:
      raise ValueError(f"category {cat!r} lacks key {e}") from None
    if cid in out:
      raise ValueError(f"category id {cid} is listed twice")
    out[cid] = isthing
  return out


def intersection_table(gt_map: np.ndarray, pred_map: np.ndarray) -> dict[tuple[int, int], int]:
  """Pixel counts of every (ground-truth id, predicted id) pair that overlaps.

  Args:
    gt_map: int64 `[H, W]` non-negative ground-truth ids.
    pred_map: int64 `[H, W]` non-negative predicted ids.

  Returns:
    `{(gt_id, pred_id): count}` for the pairs with count > 0 (void id 0 included).
  """
  gt, pred = gt_map.ravel(), pred_map.ravel()
  if not gt.size:
    return {}
  k = int(pred.max()) + 1
  gt_values = pred_values = None
  if int(gt.max()) * k + (k - 1) > _INT64_MAX:
    # The pair code would overflow: encode ranks among the present ids instead.
    gt_values, gt = np.unique(gt, return_inverse=True)
    pred_values, pred = np.unique(pred, return_inverse=True)
    k = len(pred_values)
  codes, counts = np.unique(gt * k + pred, return_counts=True)
  gt_ids, pred_ids = np.divmod(codes, k)
  if gt_values is not None:
    gt_ids, pred_ids = gt_values[gt_ids], pred_values[pred_ids]
  pairs = zip(gt_ids.tolist(), pred_ids.tolist(), strict=True)
  return dict(zip(pairs, counts.tolist(), strict=True))


def image_counts(
  gt_map: Any,
  gt_segments: Segments,
  pred_map: Any,
  pred_segments: Segments,
  image: int = 0,
  categories: Iterable[int] | None = None,
) -> dict[int, ClassCounts]:
  """Per-category matching counts of one image.

  Args:
    gt_map: int `[H, W]` ground-truth segment ids, 0 = void.
    gt_segments: ground-truth `segments_info` (`id`, `category_id`, optional `iscrowd`).
    pred_map: int `[H, W]` predicted segment ids, 0 = unlabelled.
    pred_segments: predicted `segments_info` (`id`, `category_id`).
    image: index of the image, for error messages.
    categories: known category ids; when given, other ids raise `ValueError`.

  Returns:
    `{category_id: ClassCounts}` for the categories with a tp, fp or fn in this image.
  """
  gt_map = _check_map(gt_map, image, "ground-truth")
  pred_map = _check_map(pred_map, image, "predicted")
  if gt_map.shape != pred_map.shape:
    raise ValueError(
      f"image {image}: ground-truth map {gt_map.shape} and predicted map {pred_map.shape} "
      "differ in shape"
    )
  gt_cat, gt_crowd = _parse_segments(gt_segments, image, "ground-truth")
  pred_cat, _ = _parse_segments(pred_segments, image, "predicted")
  if categories is not None:
    known = set(categories)
    unknown = (set(gt_cat.values()) | set(pred_cat.values())) - known
    if unknown:
      raise ValueError(f"image {image}: unknown category ids {_fmt_ids(unknown)}")

  inter = intersection_table(gt_map, pred_map)
  gt_area: dict[int, int] = dict.fromkeys(gt_cat, 0)
  pred_area: dict[int, int] = {}
  # Pixels of each prediction on ground-truth void, removed from its unions.
  pred_void: dict[int, int] = {}
  for (g, p), n in inter.items():
    gt_area[g] = gt_area.get(g, 0) + n
    pred_area[p] = pred_area.get(p, 0) + n
    if g == VOID:
      pred_void[p] = pred_void.get(p, 0) + n
  gt_area.pop(VOID, None)
  pred_area.pop(VOID, None)

  unlisted_gt = gt_area.keys() - gt_cat.keys()
  if unlisted_gt:
    raise ValueError(
      f"image {image}: ground-truth map holds ids {_fmt_ids(unlisted_gt)} not listed in its "
      "segments_info"
    )
  unlisted_pred = pred_area.keys() - pred_cat.keys()
  if unlisted_pred:
    raise ValueError(
      f"image {image}: predicted map holds ids {_fmt_ids(unlisted_pred)} not listed in its "
      "segments_info"
    )
  missing_pred = pred_cat.keys() - pred_area.keys()
  if missing_pred:
    raise ValueError(
      f"image {image}: predicted segments {_fmt_ids(missing_pred)} are listed in segments_info "
      "but absent from the predicted map"
    )

  counts: dict[int, ClassCounts] = {}

  def of(cat: int) -> ClassCounts:
    return counts.setdefault(cat, ClassCounts())

  matched_gt: set[int] = set()
  matched_pred: set[int] = set()
  # Pixels of each prediction on crowd regions of its own category (all such regions united).
  pred_crowd: dict[int, int] = {}
  for (g, p), n in inter.items():
    if g == VOID or p == VOID or gt_cat[g] != pred_cat[p]:
      continue
    if gt_crowd[g]:
      pred_crowd[p] = pred_crowd.get(p, 0) + n
      continue
    union = pred_area[p] + gt_area[g] - n - pred_void.get(p, 0)
    # IoU > 1/2 in exact integer arithmetic; such a match is unique on both sides.
    if 2 * n > union:
      c = of(gt_cat[g])
      c.tp += 1
      c.iou += n / union
      matched_gt.add(g)
      matched_pred.add(p)

  for g, cat in gt_cat.items():
    if g not in matched_gt and not gt_crowd[g]:
      of(cat).fn += 1
  for p, cat in pred_cat.items():
    if p in matched_pred:
      continue
    ignored = pred_void.get(p, 0) + pred_crowd.get(p, 0)
    if 2 * ignored > pred_area[p]:
      continue
    of(cat).fp += 1
  return counts


class PanopticQuality:
  """Accumulates panoptic matching counts over images; computes PQ, SQ and RQ.

  Example:
    ```
    metric = PanopticQuality()
    for gt_map, gt_segments, pred_map, pred_segments in images:
      metric.update(gt_map, gt_segments, pred_map, pred_segments)
    results = metric.compute(categories)
    ```

  Attributes:
    num_images: images seen (the index that errors name for the next `update`).
    counts: `{category_id: ClassCounts}` so far.
    seen_categories: every category id named by a segment so far (checked by `compute`).
  """

  def __init__(self, categories: Sequence[Mapping[str, Any]] | None = None):
    """Creates an empty accumulator.

    Args:
      categories: optional `{"id", "name", "isthing"}` list; when given, `update` rejects
        unknown category ids at once (naming the image) and `compute` may omit it.
    """
    self.categories = None if categories is None else list(categories)
    self._known = None if categories is None else set(_parse_categories(self.categories))
    self.num_images = 0
    self.counts: dict[int, ClassCounts] = {}
    self.seen_categories: set[int] = set()

  def update(
    self, gt_map: Any, gt_segments: Segments, pred_map: Any, pred_segments: Segments
  ) -> None:
    """Adds one image; on error nothing is added.

    Args:
      gt_map: int `[H, W]` ground-truth segment ids, 0 = void.
      gt_segments: ground-truth `segments_info` (`id`, `category_id`, optional `iscrowd`).
      pred_map: int `[H, W]` predicted segment ids, 0 = unlabelled.
      pred_segments: predicted `segments_info` (`id`, `category_id`).
    """
    image = self.num_images
    counts = image_counts(gt_map, gt_segments, pred_map, pred_segments, image, self._known)
    for cat, c in counts.items():
      self.counts.setdefault(cat, ClassCounts()).add(c)
    # Also categories that produced no count (e.g. crowd-only), so that `compute` can check them.
    self.seen_categories.update(int(s["category_id"]) for s in gt_segments)
    self.seen_categories.update(int(s["category_id"]) for s in pred_segments)
    self.num_images += 1

  def merge(self, other: PanopticQuality) -> PanopticQuality:
    """Adds the counts of `other` (e.g. gathered from another process) to this one.

    Returns:
      self.
    """
    if not isinstance(other, PanopticQuality):
      raise TypeError(f"cannot merge {type(other).__name__} into PanopticQuality")
    for cat, c in other.counts.items():
      self.counts.setdefault(cat, ClassCounts()).add(c)
    self.seen_categories |= other.seen_categories
    self.num_images += other.num_images
    return self

  def compute(self, categories: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """PQ, SQ and RQ overall, for things, for stuff and per category.

    Args:
      categories: `{"id", "name", "isthing"}` list; defaults to the constructor's.

    Returns:
      `{"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category_id:
      {"pq", "sq", "rq", "tp", "fp", "fn", "iou", "isthing"}}}`, fractions in [0, 1].
    """
    if categories is None:
      categories = self.categories
    if categories is None:
      raise ValueError("compute needs the categories (none were given to the constructor)")
    isthing = _parse_categories(categories)
    unknown = self.seen_categories - isthing.keys()
    if unknown:
      raise ValueError(f"unknown category ids {_fmt_ids(unknown)}")

    per_class: dict[int, dict[str, Any]] = {}
    for cid, thing in isthing.items():
      c = self.counts.get(cid, ClassCounts())
      denom = c.tp + 0.5 * c.fp + 0.5 * c.fn
      per_class[cid] = {
        "pq": c.iou / denom if denom else 0.0,
        "sq": c.iou / c.tp if c.tp else 0.0,
        "rq": c.tp / denom if denom else 0.0,
        "tp": c.tp,
        "fp": c.fp,
        "fn": c.fn,
        "iou": c.iou,
        "isthing": thing,
      }

    def average(select: Any) -> dict[str, Any]:
      present = [
        r for cid, r in per_class.items() if select(isthing[cid]) and r["tp"] + r["fp"] + r["fn"]
      ]
      n = len(present)
      out: dict[str, Any] = {
        k: sum(r[k] for r in present) / n if n else 0.0 for k in ("pq", "sq", "rq")
      }
      out["n"] = n
      return out

    return {
      "All": average(lambda thing: True),
      "Things": average(lambda thing: thing),
      "Stuff": average(lambda thing: not thing),
      "per_class": per_class,
    }


PQStat = PanopticQuality


def pq_compute(
  gt: Iterable[tuple[Any, Segments]],
  pred: Iterable[tuple[Any, Segments]],
  categories: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
  """Panoptic quality of predictions against ground truth over a set of images.

  Args:
    gt: per image `(segment_map int[H, W], segments_info)`, 0 = void.
    pred: per image `(segment_map int[H, W], segments_info)`, paired with `gt` by position.
    categories: `{"id", "name", "isthing"}` list.

  Returns:
    See `PanopticQuality.compute`.
  """
  metric = PanopticQuality(categories)
  missing = object()
  # Streams both iterables (a generator is never materialised) and checks they pair up.
  for image, (g, p) in enumerate(itertools.zip_longest(gt, pred, fillvalue=missing)):
    if g is missing or p is missing:
      raise ValueError(f"gt and pred differ in length: one of them ends at image {image}")
    metric.update(g[0], g[1], p[0], p[1])
  return metric.compute()
