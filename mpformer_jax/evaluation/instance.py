"""COCO instance segmentation metrics (mask AP) with pycocotools, entirely in memory.

Ground truth comes from panoptic-style annotations (a segment-id map per image plus its
segments' `{"id", "category_id", "iscrowd"}`), of which only thing categories are kept;
predictions are binary masks with scores and contiguous training labels. Both are RLE-encoded
and scored by `pycocotools.cocoeval.COCOeval(iouType="segm")` with COCO's default parameters
(IoU thresholds 0.50:0.05:0.95, 101 recall points, at most 100 detections per image and
category, areas: small <= 32^2 < medium <= 96^2 < large, measured on the mask).

Results follow detectron2's `COCOEvaluator`: `AP`, `AP50`, `AP75`, `APs`, `APm`, `APl` and
`AP-<category name>`, in percent; a metric with no ground truth to score (for instance `APl`
when no object is large) is NaN. Crowd ground truth is handled by COCOeval as usual: a
prediction that falls on a crowd region is neither a true nor a false positive.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# COCOeval's `stats` indices of the detectron2 summary metrics.
_SUMMARY = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5}


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
  """COCO compressed RLE of binary masks.

  Args:
    masks: bool (or 0/1) `[N, H, W]`.

  Returns:
    `N` dicts `{"size": [H, W], "counts": str}`; `counts` is decoded to str so that the
    results are JSON-serialisable (pycocotools accepts str and bytes alike).
  """
  masks = np.asarray(masks)
  if masks.ndim != 3:
    raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
  if masks.shape[0] == 0:
    return []
  # pycocotools reads column-major [H, W, N] uint8.
  rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
  for rle in rles:
    rle["counts"] = rle["counts"].decode("ascii")
  return rles


def coco_instance_results(
  image_id: int,
  masks: np.ndarray,
  scores: np.ndarray,
  labels: np.ndarray,
  label_to_category_id: Sequence[int] | Mapping[int, int],
) -> list[dict[str, Any]]:
  """COCO result dicts of one image's predicted instances.

  Every prediction is kept, empty masks included (COCO scores them as false positives);
  choosing which predictions to keep (top-k, score threshold) is the caller's business.

  Args:
    image_id: COCO image id.
    masks: bool `[N, H, W]` predicted masks at the ground truth's resolution.
    scores: float `[N]` confidence of each prediction.
    labels: int `[N]` contiguous training label of each prediction.
    label_to_category_id: dataset category id of each training label.

  Returns:
    `N` dicts `{"image_id", "category_id", "segmentation", "score"}`.
  """
  scores = np.asarray(scores, dtype=np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  rles = encode_masks(masks)
  if not len(rles) == len(scores) == len(labels):
    raise ValueError(f"{len(rles)} masks, {len(scores)} scores and {len(labels)} labels")
  return [
    {
      "image_id": int(image_id),
      "category_id": int(label_to_category_id[int(label)]),
      "segmentation": rle,
      "score": float(score),
    }
    for rle, score, label in zip(rles, scores, labels, strict=True)
  ]


def instance_annotations(
  image_id: int,
  segment_map: np.ndarray,
  segments: Iterable[Mapping[str, Any]],
  thing_category_ids: Iterable[int],
) -> list[dict[str, Any]]:
  """COCO ground-truth annotations (without `id`) of one image's thing segments.

  Segments of stuff categories are dropped, and so are segments with no pixel in
  `segment_map` (they could never be detected, and COCO's panoptic annotations have none).

  Args:
    image_id: COCO image id.
    segment_map: int `[H, W]` segment id of every pixel.
    segments: the image's segments, each `{"id", "category_id"}` and optionally `"iscrowd"`.
    thing_category_ids: the categories to keep.

  Returns:
    Dicts `{"image_id", "category_id", "segmentation" (RLE), "area" (pixel count),
    "bbox" ([x, y, w, h] of the mask), "iscrowd"}`.
  """
  segment_map = np.asarray(segment_map)
  things = set(int(c) for c in thing_category_ids)
  segments = [s for s in segments if int(s["category_id"]) in things]
  if not segments:
    return []
  masks = np.stack([segment_map == s["id"] for s in segments])
  areas = masks.sum(axis=(1, 2))
  rles = encode_masks(masks)
  annotations = []
  for segment, rle, area in zip(segments, rles, areas, strict=True):
    if area == 0:
      continue
    annotations.append(
      {
        "image_id": int(image_id),
        "category_id": int(segment["category_id"]),
        "segmentation": rle,
        "area": int(area),
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "iscrowd": int(segment.get("iscrowd", 0)),
      }
    )
  return annotations


def _categories(
  category_ids: Iterable[int], category_names: Mapping[int, str] | None
) -> list[dict[str, Any]]:
  names = category_names or {}
  return [{"id": int(c), "name": names.get(int(c), str(c))} for c in category_ids]


def _dataset(
  images: Sequence[Mapping[str, int]],
  annotations: Iterable[Mapping[str, Any]],
  categories: list[dict[str, Any]],
) -> dict[str, Any]:
  # Annotation ids start at 1: COCOeval uses id 0 to mean "unmatched".
  annotations = [{**a, "id": i} for i, a in enumerate(annotations, start=1)]
  return {"images": [dict(i) for i in images], "annotations": annotations, "categories": categories}


def instance_ground_truth(
  images: Iterable[tuple[int, np.ndarray, Iterable[Mapping[str, Any]]]],
  thing_category_ids: Sequence[int],
  category_names: Mapping[int, str] | None = None,
) -> dict[str, Any]:
  """The COCO ground-truth dataset dict of panoptic-style annotations, in memory.

  Args:
    images: `(image_id, segment_map int [H, W], segments)` per image, as in
      `instance_annotations`.
    thing_category_ids: the thing categories: the only ones kept and evaluated.
    category_names: optional category id -> name (for the `AP-<name>` keys); default the id.

  Returns:
    `{"images": [{"id", "height", "width"}], "annotations": [...], "categories": [...]}`, with
    annotation ids 1, 2, ...
  """
  image_infos, annotations = [], []
  for image_id, segment_map, segments in images:
    h, w = np.shape(segment_map)
    image_infos.append({"id": int(image_id), "height": int(h), "width": int(w)})
    annotations += instance_annotations(image_id, segment_map, segments, thing_category_ids)
  return _dataset(image_infos, annotations, _categories(thing_category_ids, category_names))


def _coco(dataset: Mapping[str, Any]) -> COCO:
  coco = COCO()
  coco.dataset = dict(dataset)
  coco.createIndex()
  return coco


def evaluate_instances(
  gt_dataset: Mapping[str, Any], results: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
  """COCO mask AP of `results` against `gt_dataset`, in percent.

  Args:
    gt_dataset: a COCO dataset dict (`instance_ground_truth`).
    results: COCO result dicts (`coco_instance_results`) of images in `gt_dataset`; they are
      not modified.

  Returns:
    `AP`, `AP50`, `AP75`, `APs`, `APm`, `APl` and `AP-<name>` per category. Without any result
    the evaluation still runs (pycocotools' `loadRes` cannot load an empty list): every metric
    that has ground truth is 0 and the others are NaN, as with results.
  """
  # COCOeval prints its progress and summary table; keep them out of stdout.
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = _coco(gt_dataset)
    if results:
      # loadRes adds area, bbox, id and iscrowd to the dicts it gets: give it copies.
      coco_dt = coco_gt.loadRes([dict(r) for r in results])
    else:
      # What loadRes would build from a non-empty list, minus the detections.
      coco_dt = _coco(
        {
          "images": list(gt_dataset["images"]),
          "categories": list(gt_dataset["categories"]),
          "annotations": [],
        }
      )
    coco_eval = COCOeval(coco_gt, coco_dt, iouType="segm")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()

  # COCOeval marks "no ground truth to score" with -1.
  metrics = {
    key: float(100 * coco_eval.stats[i]) if coco_eval.stats[i] >= 0 else float("nan")
    for key, i in _SUMMARY.items()
  }
  # precision: [IoU thresholds T, recall points R, categories K, area ranges A, max dets M];
  # per-category AP over all IoUs and recalls, area "all", maxDets 100 (as detectron2).
  precision = coco_eval.eval["precision"]
  names = {c["id"]: c["name"] for c in coco_gt.dataset["categories"]}
  for k, category_id in enumerate(coco_eval.params.catIds):
    p = precision[:, :, k, 0, -1]
    p = p[p > -1]
    metrics[f"AP-{names[category_id]}"] = float(100 * p.mean()) if p.size else float("nan")

  logging.info(
    "Instance segmentation: %d images, %d ground-truth objects, %d predictions: %s",
    len(coco_gt.getImgIds()),
    len(coco_gt.getAnnIds()),
    len(results),
    ", ".join(f"{k}={metrics[k]:.3f}" for k in _SUMMARY),
  )
  return metrics


class InstanceEvaluator:
  """Accumulates ground truth and predictions image by image; `compute()` scores them.

  Everything is stored RLE-encoded (a few hundred bytes per mask), so a whole validation set
  fits in host memory. In multi-process evaluation each process adds its own images, the
  `state()`s are gathered (they are plain lists of dicts) and `merge`d into one evaluator.

  Args:
    thing_category_ids: the thing categories (the only evaluated ones).
    label_to_category_id: dataset category id of each contiguous training label.
    category_names: optional category id -> name, for the per-category keys.
  """

  def __init__(
    self,
    thing_category_ids: Sequence[int],
    label_to_category_id: Sequence[int] | Mapping[int, int],
    category_names: Mapping[int, str] | None = None,
  ):
    self._categories = _categories(thing_category_ids, category_names)
    self._thing_category_ids = tuple(int(c) for c in thing_category_ids)
    self._label_to_category_id = label_to_category_id
    self._images: list[dict[str, int]] = []
    self._annotations: list[dict[str, Any]] = []
    self._results: list[dict[str, Any]] = []

  def add(
    self,
    image_id: int,
    gt_map: np.ndarray,
    gt_segments: Iterable[Mapping[str, Any]],
    masks: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
  ) -> None:
    """Adds one image.

    Args:
      image_id: COCO image id, unique over the whole evaluation.
      gt_map: int `[H, W]` ground-truth segment ids.
      gt_segments: the image's segments `{"id", "category_id", "iscrowd"}`.
      masks: bool `[N, H, W]` predicted masks.
      scores: float `[N]` prediction scores.
      labels: int `[N]` contiguous training labels of the predictions.
    """
    h, w = np.shape(gt_map)
    if np.shape(masks)[1:] != (h, w):
      raise ValueError(f"masks {np.shape(masks)} do not match the ground truth's {(h, w)}")
    self._images.append({"id": int(image_id), "height": int(h), "width": int(w)})
    self._annotations += instance_annotations(
      image_id, gt_map, gt_segments, self._thing_category_ids
    )
    self._results += coco_instance_results(
      image_id, masks, scores, labels, self._label_to_category_id
    )

  def state(self) -> dict[str, list[dict[str, Any]]]:
    """The accumulated images, annotations and results (picklable, JSON-serialisable)."""
    return {"images": self._images, "annotations": self._annotations, "results": self._results}

  def merge(self, state: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Adds the `state()` of another evaluator (for instance another process's)."""
    self._images += [dict(i) for i in state["images"]]
    self._annotations += [dict(a) for a in state["annotations"]]
    self._results += [dict(r) for r in state["results"]]

  def compute(self) -> dict[str, float]:
    """`evaluate_instances` of everything added.

    Raises:
      ValueError: if an image id was added twice.
    """
    ids = [i["id"] for i in self._images]
    if len(set(ids)) != len(ids):
      raise ValueError("an image id was added more than once")
    return evaluate_instances(
      _dataset(self._images, self._annotations, self._categories), self._results
    )
