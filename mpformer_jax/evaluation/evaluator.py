"""Evaluation of a model over a split: PQ, mIoU and mask AP, on any number of processes.

The network and the post-processing run in one jitted, batch-sharded step with fixed shapes;
the metrics accumulate on the host, image by image, from each process's own examples, and are
gathered once at the end. Which metrics depend on the task, as in detectron2's evaluators for
Mask2Former: panoptic -> PQ, mIoU and AP; instance -> AP; semantic -> mIoU. Values are in
percent.

The semantic confusion matrix is a CLU metric (`evaluation.semantic.ConfusionMatrix`) computed
inside the jitted step over the global batch and merged on device, so it needs no gathering.

Resolution: as in the reference, predictions are resized back to each image's original size
(after the test resize and padding of `dataset.eval_size`) and scored against the original
ground truth, which the eval loader provides in the `dataset.eval_original_size` canvas.
"""

from __future__ import annotations

import dataclasses
import pickle
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mpformer_jax.data.metadata import DatasetMetadata
from mpformer_jax.evaluation import postprocess
from mpformer_jax.evaluation.instance import InstanceEvaluator
from mpformer_jax.evaluation.panoptic import PanopticQuality
from mpformer_jax.evaluation.semantic import semantic_metrics

IGNORE_LABEL = 255
INPUT_KEYS = ("image", "resized_size", "image_size", "semantic_gt")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Post-processing settings (`config.evaluation`; spec section 5).

  Attributes:
    object_mask_threshold: panoptic: minimum class score of a kept query (0.8).
    overlap_threshold: panoptic: minimum visible share of a query's mask (0.8).
    top_k: instance results per image (`TEST.DETECTIONS_PER_IMAGE`, 100).
  """

  object_mask_threshold: float = 0.8
  overlap_threshold: float = 0.8
  top_k: int = 100

  @classmethod
  def from_config(cls, config) -> EvalSettings:
    return cls(
      object_mask_threshold=float(config.object_mask_threshold),
      overlap_threshold=float(config.overlap_threshold),
      top_k=int(config.top_k),
    )


def metrics_for_task(task: str) -> tuple[str, ...]:
  return {
    "panoptic": ("panoptic", "semantic", "instance"),
    "instance": ("instance",),
    "semantic": ("semantic",),
  }[task]


def make_predict_fn(
  model,
  meta: DatasetMetadata,
  settings: EvalSettings,
  output_size: tuple[int, int],
  with_confusion: bool = True,
) -> Callable[..., dict[str, Any]]:
  """`predict(variables, images, resized_size, image_size, semantic_gt) -> outputs` (jit-able).

  The reference's inference (spec section 5): mask logits upsampled to the padded input, then
  cropped to the image and resized to its original size (`postprocess.resize_to_original`)
  before the panoptic, instance and semantic inference. Semantic-only runs resize the per-class
  scores instead, as the reference post-processes them after `semantic_inference`.

  With `with_confusion=False` (predictions without ground truth) `semantic_gt` is ignored and
  no `confusion` is returned.

  Args of `predict`: `images` float32 `[B, H, W, 3]`; `resized_size` int32 `[B, 2]` (the image
  inside the padded canvas); `image_size` int32 `[B, 2]` (the size to resize predictions to,
  the original size; each within `output_size`); `semantic_gt` int32 `[B, Ho, Wo]` training
  labels at `image_size`, top-left in the `output_size` canvas, `IGNORE_LABEL` where unlabeled
  (padding included).

  Outputs (in the `output_size` canvas `[Ho, Wo]`; pixels outside `image_size` are void / 0,
  semantic -1): `semantic` int32 `[B, Ho, Wo]`; for the semantic metrics `confusion`, the
  batch's `ConfusionMatrix` CLU metric; for panoptic `panoptic` (`PanopticOutput` fields); for
  panoptic and instance `instance` (`InstanceOutput` fields, `top_k` results).

  Args:
    model: the network.
    meta: the dataset's metadata (task, classes).
    settings: post-processing thresholds.
    output_size: static `(Ho, Wo)` canvas of the outputs (`data.config.eval_original_canvas`).
    with_confusion: whether to compute the semantic confusion matrix.
  """
  kinds = metrics_for_task(meta.task)
  isthing = np.asarray(meta.label_isthing, bool)
  num_classes = meta.num_classes
  output_size = (int(output_size[0]), int(output_size[1]))
  confusion_metric = None
  if "semantic" in kinds and with_confusion:
    from mpformer_jax.evaluation.semantic import ConfusionMatrix

    confusion_metric = ConfusionMatrix.configure(num_classes, IGNORE_LABEL, meta.label_names)

  def predict(variables, images, resized_size, image_size, semantic_gt):
    out = model.apply(variables, images, train=False)
    logits = out["pred_logits"]
    masks = postprocess.upsample_masks(out["pred_masks"], images.shape[1:3])
    if meta.task == "semantic":
      scores = postprocess.semantic_inference(logits, masks)
      scores, valid = postprocess.resize_to_original(scores, resized_size, image_size, output_size)
      semantic = jnp.argmax(scores, axis=1).astype(jnp.int32)
      result = {"semantic": jnp.where(valid, semantic, -1)}
    else:
      masks, valid = postprocess.resize_to_original(masks, resized_size, image_size, output_size)
      result = {"semantic": postprocess.semantic_segmentation(logits, masks, valid)}
    if confusion_metric is not None:
      result["confusion"] = confusion_metric.from_model_output(
        sem_seg_pred=result["semantic"], sem_seg_gt=semantic_gt, mask=valid
      )
    if "panoptic" in kinds:
      result["panoptic"] = postprocess.panoptic_inference(
        logits,
        masks,
        jnp.asarray(isthing),
        object_mask_threshold=settings.object_mask_threshold,
        overlap_threshold=settings.overlap_threshold,
        valid_pixels=valid,
      )._asdict()
    if "instance" in kinds:
      result["instance"] = postprocess.instance_inference(
        logits,
        masks,
        num_classes,
        top_k=settings.top_k,
        thing_only_labels=jnp.asarray(isthing) if meta.task == "panoptic" else None,
        valid_pixels=valid,
      )._asdict()
    return result

  return predict


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in global order."""
  if jax.process_count() == 1:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  shards = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    shards.setdefault(start, np.asarray(shard.data))  # replicas of a row block are identical
  return np.concatenate([shards[k] for k in sorted(shards)])


def _allgather_objects(obj: Any) -> list[Any]:
  """Every process's `obj` (picklable), in process order; one collective round."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  data = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int64))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[: data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [pickle.loads(gathered[i, : int(sizes[i, 0])].tobytes()) for i in range(len(sizes))]


def gt_segments(batch: dict[str, np.ndarray], i: int, meta: DatasetMetadata) -> list[dict]:
  """Ground-truth segments `{"id", "category_id", "iscrowd", "label"}` of example `i`."""
  category_of = meta.label_category_ids
  segments = []
  for s in np.flatnonzero(batch["gt_valid"][i]):
    label = int(batch["gt_labels"][i, s])
    if label < 0:  # a category outside the task's label space (stuff in the instance task)
      continue
    segments.append(
      {
        "id": int(batch["gt_ids"][i, s]),
        "category_id": int(category_of[label]),
        "iscrowd": int(batch["gt_iscrowd"][i, s]),
        "label": label,
      }
    )
  return segments


def semantic_ground_truth(pan_map: np.ndarray, segments: list[dict]) -> np.ndarray:
  """int32 `[H, W]` training labels of a panoptic map; void and unlisted ids are ignored (255).

  Crowd regions keep their class, as in detectron2's semantic ground truth of COCO panoptic.
  """
  ids = np.array([s["id"] for s in segments], np.int64)
  labels = np.array([s["label"] for s in segments], np.int32)
  order = np.argsort(ids)
  ids, labels = ids[order], labels[order]
  pos = np.clip(np.searchsorted(ids, pan_map), 0, max(len(ids) - 1, 0))
  found = (ids[pos] == pan_map) if len(ids) else np.zeros(pan_map.shape, bool)
  return np.where(found & (pan_map > 0), labels[pos] if len(ids) else 0, IGNORE_LABEL).astype(
    np.int32
  )


def batch_semantic_ground_truth(batch: dict[str, np.ndarray], meta) -> np.ndarray:
  """int32 `[b, H, W]` semantic labels of a local eval batch (padding examples: all ignored)."""
  out = np.full(batch["panoptic"].shape, IGNORE_LABEL, np.int32)
  for i in np.flatnonzero(batch["is_real"]):
    out[i] = semantic_ground_truth(batch["panoptic"][i], gt_segments(batch, i, meta))
  return out


def semantic_targets(batch: dict[str, np.ndarray], meta) -> np.ndarray:
  """int32 `[b, Ho, Wo]` semantic ground truth of a local eval batch.

  The loader's `semantic_gt` where the dataset has its own semantic annotation (ADE20K
  panoptic, as the reference scores it); otherwise the panoptic map merged by class.
  """
  if "semantic_gt" in batch:
    return batch["semantic_gt"]
  return batch_semantic_ground_truth(batch, meta)


class MetricsAccumulator:
  """Host-side metrics of one evaluation pass (this process's images), gathered by `compute`."""

  def __init__(self, meta: DatasetMetadata):
    self.meta = meta
    self.kinds = metrics_for_task(meta.task)
    self.num_images = 0
    self.pq = PanopticQuality(meta.categories) if "panoptic" in self.kinds else None
    self.confusion = None  # the merged `ConfusionMatrix` (global batches: not gathered)
    names = {c["id"]: c["name"] for c in meta.categories}
    self.instances = (
      InstanceEvaluator(meta.thing_category_ids, meta.label_category_ids, names)
      if "instance" in self.kinds
      else None
    )

  def add_confusion(self, confusion) -> None:
    """Merges one global batch's `ConfusionMatrix` (device arrays: merged on device)."""
    self.confusion = confusion if self.confusion is None else self.confusion.merge(confusion)

  def add_batch(self, batch: dict[str, np.ndarray], outputs: dict[str, Any]) -> None:
    """Adds the real examples of one local batch (`outputs`: host arrays of `predict`)."""
    meta = self.meta
    for i in np.flatnonzero(batch["is_real"]):
      h, w = (int(v) for v in batch["image_size"][i])
      gt_map = batch["panoptic"][i, :h, :w]
      segments = gt_segments(batch, i, meta)
      if self.pq is not None:
        p = outputs["panoptic"]
        pred_map, pred_segments = postprocess.panoptic_segments_info(
          p["segment_map"][i],
          p["segment_labels"][i],
          p["segment_scores"][i],
          meta.label_isthing,
          meta.label_category_ids,
          image_size=(h, w),
        )
        self.pq.update(gt_map, segments, pred_map, pred_segments)
      if self.instances is not None:
        inst = outputs["instance"]
        keep = inst["valid"][i]
        self.instances.add(
          int(batch["image_id"][i]) if "image_id" in batch else int(batch["index"][i]),
          gt_map,
          [s for s in segments if s["category_id"] in meta.thing_category_ids],
          inst["masks"][i][keep][:, :h, :w],
          inst["scores"][i][keep],
          inst["labels"][i][keep],
        )
      self.num_images += 1

  def compute(self) -> dict[str, float]:
    """Gathers every process's state and returns the flat metrics (percent)."""
    state = {
      "num_images": self.num_images,
      "pq": self.pq,
      "instances": None if self.instances is None else self.instances.state(),
    }
    states = _allgather_objects(state)
    results: dict[str, float] = {"num_images": float(sum(s["num_images"] for s in states))}
    if self.pq is not None:
      pq = PanopticQuality(self.meta.categories)
      for s in states:
        pq.merge(s["pq"])
      summary = pq.compute()
      for group, prefix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
          results[f"{key.upper()}{prefix}"] = 100.0 * float(summary[group][key])
    if "semantic" in self.kinds:
      k = self.meta.num_classes
      # Each batch's matrix already covers every process's images.
      confusion = (
        np.zeros((k, k), np.int64) if self.confusion is None else self.confusion.confusion()
      )
      sem = semantic_metrics(confusion, self.meta.label_names)
      results.update({k: float(sem[k]) for k in ("mIoU", "fwIoU", "mACC", "pACC")})
    if self.instances is not None:
      merged = InstanceEvaluator(
        self.meta.thing_category_ids,
        self.meta.label_category_ids,
        {c["id"]: c["name"] for c in self.meta.categories},
      )
      for s in states:
        merged.merge(s["instances"])
      ap = merged.compute()
      results.update({k: float(ap[k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")})
    return results


def evaluate(
  predict_fn: Callable,
  variables: Any,
  batches: Iterable[dict[str, np.ndarray]],
  meta: DatasetMetadata,
  to_device: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]],
  on_batch: Callable[[dict[str, np.ndarray], dict[str, Any]], None] | None = None,
) -> dict[str, float]:
  """One pass over `batches`: predictions on device, metrics on the host.

  Args:
    predict_fn: the jitted `make_predict_fn` result.
    variables: model variables (`{"params", "batch_stats"?}`), placed for `predict_fn`.
    batches: this process's eval batches (`create_eval_loader`).
    meta: the dataset's metadata.
    to_device: this process's `INPUT_KEYS` arrays -> global sharded arrays.
    on_batch: optional callback with each local batch and its host outputs (overlays, export).

  Returns:
    Flat metrics in percent, plus `num_images`, `eval_seconds` and `images_per_sec`.
  """
  accumulator = MetricsAccumulator(meta)
  start = time.perf_counter()
  pending = None
  for batch in batches:
    batch = {**batch, "semantic_gt": semantic_targets(batch, meta)}
    inputs = to_device({k: batch[k] for k in INPUT_KEYS})
    outputs = predict_fn(variables, *(inputs[k] for k in INPUT_KEYS))
    if "confusion" in outputs:
      accumulator.add_confusion(outputs.pop("confusion"))
    # Host work on batch n overlaps the device's work on batch n + 1.
    if pending is not None:
      _consume(accumulator, *pending, on_batch)
    pending = (batch, outputs)
  if pending is not None:
    _consume(accumulator, *pending, on_batch)
  results = accumulator.compute()
  seconds = time.perf_counter() - start
  results["eval_seconds"] = seconds
  results["images_per_sec"] = results["num_images"] / max(seconds, 1e-9)
  logging.info(
    "Evaluated %d images in %.1f s: %s",
    int(results["num_images"]),
    seconds,
    ", ".join(f"{k}={v:.2f}" for k, v in results.items() if k not in ("num_images",)),
  )
  return results


def _consume(accumulator, batch, outputs, on_batch) -> None:
  host = jax.tree.map(local_rows, outputs)
  accumulator.add_batch(batch, host)
  if on_batch is not None:
    on_batch(batch, host)
