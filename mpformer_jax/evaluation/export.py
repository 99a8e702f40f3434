"""Prediction files in the formats other tools read, plus pictures for people.

For every image `<name>` (host side, numpy + PIL + pycocotools):

- panoptic task: `panoptic/<name>.png` in the COCO panoptic encoding (id = R + 256 G + 256^2 B)
  and one entry of `panoptic.json` (`{"annotations": [{"image_id", "file_name",
  "segments_info": [{"id", "category_id", "iscrowd", "isthing", "score", "area"}]}],
  "categories": [...], "images": [...]}`), the format of COCO panoptic predictions;
- panoptic and semantic tasks: `semantic/<name>.png`, the contiguous training label of every
  pixel (uint8, uint16 beyond 255 classes); `semantic/labels.json` maps labels to categories;
- panoptic and instance tasks: `instances.json`, COCO instance results (`[{"image_id",
  "category_id", "segmentation": RLE, "score"}]`) with every kept prediction;
- `overlays/<name>.png`: `[image | prediction]` side by side;
- `images.json`: `[{"id", "file_name", "height", "width"}]`, the image ids the JSON files use.

Predictions are written at each image's original size. An image larger than the model's canvas
is shrunk to fit before inference; its maps and masks are then resized back with nearest
neighbours (the evaluation compares at the canvas resolution instead; see `evaluator.py`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from mpformer_jax.data import panoptic_png
from mpformer_jax.data.metadata import DatasetMetadata
from mpformer_jax.data.transforms import resize_ids
from mpformer_jax.evaluation import instance, overlays, postprocess

# Instances drawn in the overlay of the instance task (all of them go to `instances.json`).
OVERLAY_INSTANCE_SCORE = 0.5


def unique_names(paths: list[str]) -> list[str]:
  """Output names: each file's stem, with `_<n>` appended where stems repeat."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  counts: dict[str, int] = {}
  for s in stems:
    counts[s] = counts.get(s, 0) + 1
  return [s if counts[s] == 1 else f"{s}_{i}" for i, s in enumerate(stems)]


def _resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if masks.shape[1:] == tuple(size):
    return masks
  return np.stack([resize_ids(m, size) for m in masks]) if len(masks) else masks.reshape(0, *size)


def _save_label_png(path: str, labels: np.ndarray, num_classes: int) -> None:
  if num_classes <= 255:
    Image.fromarray(labels.astype(np.uint8)).save(path)
  else:
    Image.fromarray(labels.astype(np.uint16)).save(path)


def _instance_map(masks: np.ndarray, scores: np.ndarray, labels: np.ndarray):
  """A segment map of the confident instances, the most confident on top, for pictures."""
  segment_map = np.zeros(masks.shape[1:], np.int32)
  labels_of_ids = {}
  for n in np.argsort(scores):  # ascending: later ones paint over
    if scores[n] >= OVERLAY_INSTANCE_SCORE:
      segment_map[masks[n]] = n + 1
      labels_of_ids[int(n) + 1] = int(labels[n])
  return segment_map, labels_of_ids


class PredictionWriter:
  """Writes one image's predictions at a time; `close` writes the JSON files.

  Args:
    output_dir: where everything goes (created).
    meta: the dataset's metadata (task, categories, labels).
  """

  def __init__(self, output_dir: str, meta: DatasetMetadata):
    self.output_dir = output_dir
    self.meta = meta
    self.images: list[dict[str, Any]] = []
    self.panoptic_annotations: list[dict[str, Any]] = []
    self.instance_results: list[dict[str, Any]] = []
    self._dirs = ["overlays"]
    if meta.task in ("panoptic", "semantic"):
      self._dirs.append("semantic")
    if meta.task == "panoptic":
      self._dirs.append("panoptic")
    for d in self._dirs:
      os.makedirs(os.path.join(output_dir, d), exist_ok=True)

  def add(
    self,
    name: str,
    file_name: str,
    image: np.ndarray,
    outputs: Mapping[str, Any],
    predicted_size: tuple[int, int],
  ) -> None:
    """Writes the files of one image.

    Args:
      name: output name (no extension), unique within the run.
      file_name: the input file, recorded in `images.json`.
      image: uint8 `[H, W, 3]`, the original image.
      outputs: this image's rows of `make_predict_fn`'s outputs (host arrays at the canvas
        size: `semantic` `[h', w']`, `panoptic` / `instance` dicts).
      predicted_size: `(h, w)` of the image inside the outputs' canvas: its original size, or
        a smaller one when the original does not fit the canvas (then the maps are enlarged
        to the original size by nearest neighbour).
    """
    meta = self.meta
    size = image.shape[:2]
    h, w = predicted_size
    image_id = len(self.images)
    self.images.append(
      {"id": image_id, "file_name": file_name, "height": size[0], "width": size[1]}
    )
    labels_of_ids: dict[int, int] = {}
    picture_map = None
    if "semantic" in self._dirs:
      semantic = resize_ids(np.asarray(outputs["semantic"])[:h, :w], size)
      _save_label_png(
        os.path.join(self.output_dir, "semantic", f"{name}.png"), semantic, meta.num_classes
      )
      picture_map = semantic + 1
      labels_of_ids = {c + 1: c for c in range(meta.num_classes)}
    if meta.task == "panoptic":
      p = outputs["panoptic"]
      segment_map, infos = postprocess.panoptic_segments_info(
        p["segment_map"],
        p["segment_labels"],
        p["segment_scores"],
        meta.label_isthing,
        meta.label_category_ids,
        image_size=(h, w),
      )
      segment_map = resize_ids(segment_map, size)
      areas = np.bincount(segment_map.ravel(), minlength=len(infos) + 1)
      png_name = f"{name}.png"
      Image.fromarray(panoptic_png.id_to_rgb(segment_map)).save(
        os.path.join(self.output_dir, "panoptic", png_name)
      )
      self.panoptic_annotations.append(
        {
          "image_id": image_id,
          "file_name": png_name,
          "segments_info": [
            {
              "id": s["id"],
              "category_id": s["category_id"],
              "iscrowd": 0,
              "isthing": s["isthing"],
              "score": s["score"],
              "area": int(areas[s["id"]]),
            }
            for s in infos
          ],
        }
      )
      picture_map = segment_map
      labels_of_ids = {s["id"]: s["label"] for s in infos}
    if meta.task in ("panoptic", "instance"):
      inst = outputs["instance"]
      keep = np.asarray(inst["valid"], bool)
      masks = _resize_masks(np.asarray(inst["masks"])[keep][:, :h, :w], size)
      scores = np.asarray(inst["scores"])[keep]
      labels = np.asarray(inst["labels"])[keep]
      self.instance_results += instance.coco_instance_results(
        image_id, masks, scores, labels, meta.label_category_ids
      )
      if meta.task == "instance":
        picture_map, labels_of_ids = _instance_map(masks, scores, labels)
    picture = overlays.overlay(image, picture_map, labels_of_ids, meta.num_classes)
    overlays.save_png(
      os.path.join(self.output_dir, "overlays", f"{name}.png"),
      overlays.side_by_side(image, picture),
    )

  def close(self) -> dict[str, Any]:
    """Writes the JSON files; returns what was written (`num_images` and the paths)."""
    meta = self.meta
    written: dict[str, Any] = {"num_images": len(self.images)}

    def dump(name: str, value: Any) -> None:
      path = os.path.join(self.output_dir, name)
      with open(path, "w") as f:
        json.dump(value, f)
      written[name] = path

    dump("images.json", self.images)
    if meta.task == "panoptic":
      dump(
        "panoptic.json",
        {
          "annotations": self.panoptic_annotations,
          "categories": list(meta.categories),
          "images": self.images,
        },
      )
    if "semantic" in self._dirs:
      names = {c["id"]: c["name"] for c in meta.categories}
      dump(
        os.path.join("semantic", "labels.json"),
        [
          {"label": k, "category_id": c, "name": names[c]}
          for k, c in enumerate(meta.label_category_ids)
        ],
      )
    if meta.task in ("panoptic", "instance"):
      dump("instances.json", self.instance_results)
    written["overlays"] = os.path.join(self.output_dir, "overlays")
    return written
