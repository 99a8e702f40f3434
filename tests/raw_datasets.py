"""Tiny raw datasets in the official on-disk formats of COCO, ADE20K and Cityscapes (for tests).

All images are `SIZE` = 32 x 48. COCO writers take a `str` directory, the others a
`pathlib.Path`.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from mpformer_jax.data import coco_categories, panoptic_png

SIZE = H, W = 32, 48

# ---------------------------------------------------------------------------------------------
# COCO 2017.


def coco_image(seed: int, h: int = H, w: int = W) -> np.ndarray:
  """A smooth image (JPEG keeps it close) with a seed-dependent colour."""
  yy, xx = np.mgrid[0:h, 0:w]
  rgb = np.stack([4 * xx + 10 * seed, 6 * yy + 20, 120 + 30 * seed + 0 * xx], -1)
  return np.clip(rgb, 0, 255).astype(np.uint8)


def write_json(path, data) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f)


def write_jpeg(path, rgb) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(rgb).save(path, format="JPEG", quality=95)


def _json_categories(table) -> list[dict]:
  # The official files also carry `supercategory` (and `color` in the panoptic one).
  return [{"supercategory": "x", **c, "isthing": int(c["isthing"])} for c in table]


def _bbox(mask) -> list[float]:
  ys, xs = np.nonzero(mask)
  if not len(ys):
    return [0.0, 0.0, 0.0, 0.0]
  return [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]


def coco_panoptic_scenes() -> dict:
  """split dir -> [(image_id, seed, id map, [(segment id, category id, iscrowd)])].

  Ids use all three PNG channels; 0 is void.
  """
  a = np.zeros((H, W), np.int64)
  a[:12] = 0x30201  # sky-other-merged (187)
  a[14:30, 4:20] = 7  # person (1)
  a[14:30, 24:44] = 70000  # crowd of people (1, iscrowd)
  b = np.full((H, W), 3_000_000)  # grass-merged (193)
  b[8:24, 10:30] = 42  # dog (18)
  c = np.zeros((H, W), np.int64)  # an image without segments: kept
  val = [
    (139, 1, a, [(0x30201, 187, 0), (7, 1, 0), (70000, 1, 1)]),
    (285, 2, b, [(3_000_000, 193, 0), (42, 18, 0)]),
    (632, 3, c, []),
  ]
  train = [(9, 4, b.copy(), [(3_000_000, 193, 0), (42, 18, 0)])]
  return {"val2017": val, "train2017": train}


def write_coco_panoptic(raw: str, scenes=None) -> dict:
  """COCO panoptic files (JPEGs, PNGs, JSON) for `scenes` under `raw`; returns the scenes."""
  scenes = scenes or coco_panoptic_scenes()
  for split_dir, items in scenes.items():
    images, annotations = [], []
    for image_id, seed, ids, segments in items:
      name = f"{image_id:012d}"
      write_jpeg(os.path.join(raw, split_dir, name + ".jpg"), coco_image(seed))
      png = os.path.join(raw, "annotations", f"panoptic_{split_dir}", name + ".png")
      os.makedirs(os.path.dirname(png), exist_ok=True)
      Image.fromarray(panoptic_png.id_to_rgb(ids)).save(png)
      images.append({"id": image_id, "file_name": name + ".jpg", "height": H, "width": W})
      info = [
        {
          "id": i,
          "category_id": c,
          "iscrowd": crowd,
          "area": int(np.sum(ids == i)),
          "bbox": _bbox(ids == i),
        }
        for i, c, crowd in segments
      ]
      annotations.append({"image_id": image_id, "file_name": name + ".png", "segments_info": info})
    data = {
      "info": {"year": 2017},
      "licenses": [],
      "images": images,
      "annotations": annotations,
      "categories": _json_categories(coco_categories.PANOPTIC_CATEGORIES),
    }
    write_json(os.path.join(raw, "annotations", f"panoptic_{split_dir}.json"), data)
  return scenes


def uncompressed_rle(mask) -> dict:
  """COCO's crowd encoding: run lengths in column-major order, starting with background."""
  flat = np.asarray(mask, np.uint8).ravel(order="F")
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  runs = np.diff(bounds).tolist()
  if flat[0]:
    runs = [0, *runs]
  return {"counts": runs, "size": list(mask.shape)}


def poly_mask(polygons) -> np.ndarray:
  return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, H, W))).astype(bool)


# The instances of image 139 (val2017): overlapping masks in each of COCO's encodings.
PERSON_POLY = [[4.0, 4.0, 30.0, 4.0, 30.0, 24.0, 4.0, 24.0]]  # large
DOG_POLY = [[20.0, 10.0, 40.0, 10.0, 40.0, 20.0, 20.0, 20.0]]  # overlaps the person, smaller
CROWD = np.zeros((H, W), bool)
CROWD[20:32, 0:16] = True  # overlaps the person's bottom-left
CAT = np.zeros((H, W), bool)
CAT[2:8, 26:36] = True  # compressed RLE, overlaps the person's top-right corner


def write_coco_instances(raw: str) -> dict:
  """COCO instance files under `raw`: val2017 images 139 (annotated) and 285, train2017 image 9.

  Image 139's annotations 1..5: person (polygon), dog (polygon), crowd of people (uncompressed
  RLE), cat (compressed RLE), a degenerate polygon; image 9 has one dog.
  """
  cat_rle = mask_util.encode(np.asfortranarray(CAT.astype(np.uint8)))
  anns = [
    (1, 1, PERSON_POLY, 0),
    (2, 18, DOG_POLY, 0),
    (3, 1, uncompressed_rle(CROWD), 1),
    (4, 17, {"counts": cat_rle["counts"].decode(), "size": [H, W]}, 0),
    (5, 1, [[1.0, 1.0, 2.0, 2.0]], 0),  # a degenerate polygon: empty mask
  ]
  annotations = [
    {
      "id": i,
      "image_id": 139,
      "category_id": c,
      "segmentation": seg,
      "area": 1.0,
      "bbox": [0.0, 0.0, 1.0, 1.0],
      "iscrowd": crowd,
    }
    for i, c, seg, crowd in anns
  ]
  splits = {"val2017": ([139, 285], annotations), "train2017": ([9], [])}
  splits["train2017"][1].append({**annotations[1], "id": 10, "image_id": 9})
  for split_dir, (image_ids, split_anns) in splits.items():
    images = []
    for seed, image_id in enumerate(image_ids):
      name = f"{image_id:012d}.jpg"
      write_jpeg(os.path.join(raw, split_dir, name), coco_image(seed))
      images.append({"id": image_id, "file_name": name, "height": H, "width": W})
    data = {
      "images": images,
      "annotations": split_anns,
      "categories": _json_categories(coco_categories.INSTANCE_CATEGORIES),
    }
    write_json(os.path.join(raw, "annotations", f"instances_{split_dir}.json"), data)
  return splits


# ---------------------------------------------------------------------------------------------
# ADE20K SceneParsing.

ADE_ROOT = "ADEChallengeData2016"
# TFDS split -> (directory, file-name prefix).
ADE_SPLITS = {"train": ("training", "train"), "validation": ("validation", "val")}


def ade_label_map(seed: int) -> np.ndarray:
  """A uint8 `[32, 48]` annotation: void, stuff and thing classes, including 150 (the last)."""
  label = np.zeros(SIZE, np.uint8)
  label[:12] = 3  # sky
  label[12:, :20] = 1 + seed  # wall / building
  label[14:30, 22:40] = 13  # person
  label[20:26, 42:] = 150  # flag
  label[28:, 40:] = 0  # "other": void
  return label


def ade_image(seed: int, gray: bool = False) -> np.ndarray:
  rng = np.random.default_rng(seed)
  shape = SIZE if gray else (*SIZE, 3)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def ade_paths(raw, split: str, index: int):
  """`(image, annotation)` paths of example `index` of `split`; creates their directories."""
  directory, prefix = ADE_SPLITS[split]
  stem = f"ADE_{prefix}_{index:08d}"
  image = raw / ADE_ROOT / "images" / directory / f"{stem}.jpg"
  label = raw / ADE_ROOT / "annotations" / directory / f"{stem}.png"
  image.parent.mkdir(parents=True, exist_ok=True)
  label.parent.mkdir(parents=True, exist_ok=True)
  return image, label


def write_ade20k(raw, split: str, index: int, image: np.ndarray, label: np.ndarray):
  """Writes one example as the official files: JPEG image, single-channel uint8 PNG."""
  image_path, label_path = ade_paths(raw, split, index)
  Image.fromarray(image).save(image_path, format="JPEG", quality=90)
  Image.fromarray(label).save(label_path)
  return image_path, label_path


# Instance classes (R channel of the instance PNGs) of some ADE20K thing classes: instance class
# k is the k-th thing class in increasing id order (Mask2Former's
# `ade20k_instance_catid_mapping.txt`).
ADE_BED, ADE_PERSON, ADE_CHAIR, ADE_FLAG = 1, 4, 8, 100  # semantic classes 8, 13, 20, 150


def ade_panoptic_annotation(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A semantic annotation uint8 `[32, 48]` and the matching instance PNG uint8 `[32, 48, 3]`.

  Semantic: sky (3), wall / building (1 + seed), grass (10), person (13), flag (150), void.
  Instances (R = instance class, G = instance id, B = noise the reference ignores):

  - G 1 and G 2: two persons on the person pixels, leaving a column of person pixels between
    them without an instance (void in the panoptic map);
  - G 5: a chair over sky and wall pixels (the stuff it overwrites is counted);
  - G 7: a bed covering all of the grass (an emptied stuff segment, removed);
  - G 9: the flag, on its semantic pixels;
  - a pixel with a class but no instance id (R > 0, G = 0): ignored, it stays wall.
  """
  label = np.zeros(SIZE, np.uint8)
  label[:12] = 3  # sky
  label[12:, :20] = 1 + seed  # wall / building
  label[0:2, 44:48] = 10  # grass
  label[14:30, 22:40] = 13  # person
  label[20:26, 42:] = 150  # flag
  label[28:, 40:] = 0  # "other": void
  instances = np.zeros((*SIZE, 3), np.uint8)
  for g, r, (rows, cols) in (
    (1, ADE_PERSON, (slice(14, 30), slice(22, 30))),
    (2, ADE_PERSON, (slice(14, 30 - seed), slice(32, 40))),
    (5, ADE_CHAIR, (slice(8, 16), slice(4, 12))),
    (7, ADE_BED, (slice(0, 4), slice(40, 48))),
    (9, ADE_FLAG, (slice(20, 26), slice(42, 48))),
  ):
    instances[rows, cols] = (r, g, 0)
  instances[..., 2] = np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8)
  instances[31, 0] = (ADE_PERSON, 0, 0)
  return label, instances


def ade_instance_path(raw, split: str, index: int):
  """The instance annotation path of example `index` of `split`; creates its directory."""
  directory, prefix = ADE_SPLITS[split]
  path = raw / ADE_ROOT / "annotations_instance" / directory / f"ADE_{prefix}_{index:08d}.png"
  path.parent.mkdir(parents=True, exist_ok=True)
  return path


def write_ade20k_panoptic(raw, split: str, index: int, image, label, instances):
  """Writes one example as the official files: JPEG, uint8 L semantic PNG, uint8 RGB instance
  PNG. Returns the three paths."""
  image_path, label_path = write_ade20k(raw, split, index, image, label)
  instance_path = ade_instance_path(raw, split, index)
  Image.fromarray(instances).save(instance_path)
  return image_path, label_path, instance_path


# ---------------------------------------------------------------------------------------------
# Cityscapes fine.

CITYSCAPES_SPLIT_DIRS = {"train": "train", "validation": "val"}


def cityscapes_annotation(variant: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 labelIds `[32, 48]` and the matching uint16 instanceIds.

  Segments: stuff (road 7, building 11, sky 23), a group of people (24: crowd), a person
  (24000), two cars (26000, 26001). Void: ego vehicle (1), a caravan instance (29000: trainId
  255), and a pixel where the two files disagree only on void labels (labelIds 0, instanceIds 3).
  """
  labels = np.full(SIZE, 7, np.uint8)  # road
  labels[:6] = 23  # sky
  labels[6:10] = 11  # building
  labels[30:] = 1  # ego vehicle
  instances = labels.astype(np.uint16)
  for value, (rows, cols) in {
    26000: (slice(12, 20), slice(2, 12)),
    26001: (slice(12, 20 - variant), slice(14, 22)),
    24000: (slice(12, 24), slice(26, 30)),
    24: (slice(12, 24), slice(32, 40 + variant)),  # a group: no instance id
    29000: (slice(22, 28), slice(2, 10)),  # caravan: void
  }.items():
    instances[rows, cols] = value
    labels[rows, cols] = value // 1000 if value >= 1000 else value
  labels[31, 47], instances[31, 47] = 0, 3  # both void: not a conflict
  return labels, instances


def cityscapes_paths(raw, split: str, city: str, frame: int):
  """`(image, labelIds, instanceIds)` paths of one frame; creates their directories."""
  stem = f"{city}_000000_{frame:06d}"
  image = raw / "leftImg8bit" / CITYSCAPES_SPLIT_DIRS[split] / city / f"{stem}_leftImg8bit.png"
  gt = raw / "gtFine" / CITYSCAPES_SPLIT_DIRS[split] / city
  image.parent.mkdir(parents=True, exist_ok=True)
  gt.mkdir(parents=True, exist_ok=True)
  return image, gt / f"{stem}_gtFine_labelIds.png", gt / f"{stem}_gtFine_instanceIds.png"


def write_cityscapes(
  raw, split: str, city: str, frame: int, variant: int = 0, labels=None, instances=None
):
  """Writes one frame as the official files: RGB PNG, 8-bit labelIds, 16-bit instanceIds.

  Returns:
    `(paths, image, instances)`: the three paths, the uint8 `[32, 48, 3]` image and the
    instanceIds written.
  """
  paths = cityscapes_paths(raw, split, city, frame)
  default_labels, default_instances = cityscapes_annotation(variant)
  labels = default_labels if labels is None else labels
  instances = default_instances if instances is None else instances
  image = np.random.default_rng(frame).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
  Image.fromarray(image).save(paths[0])
  Image.fromarray(labels.astype(np.uint8)).save(paths[1])
  Image.fromarray(instances.astype(np.uint16)).save(paths[2])
  return paths, image, instances


# ---------------------------------------------------------------------------------------------
# Bad-data checks shared by the ADE20K and Cityscapes tests.


def check_bad_train_example(name: str, raw, tmp_path, bad_file, reason: str) -> None:
  """`raw` (one train and one validation example; the train one bad) fails a strict build of
  dataset `name` naming `bad_file`, and a `skip_bad` build leaves it out and reports it."""
  import pytest
  import tensorflow_datasets as tfds

  from mpformer_jax.data.prepare import prepare
  from mpformer_jax.data.raw_io import BadExampleError

  with pytest.raises(BadExampleError, match=re.escape(str(bad_file))) as error:
    prepare(name, str(raw), str(tmp_path / "strict"))
  assert error.value.file == str(bad_file) and reason in error.value.problem

  data_dir = str(tmp_path / "lenient")
  builder, report = prepare(name, str(raw), data_dir, skip_bad=True)
  assert report.skip_bad and len(report.skipped) == 1
  skipped_file, skipped_reason = report.skipped[0]
  assert skipped_file == str(bad_file) and reason in skipped_reason
  assert report.examples == {"train": 1, "validation": 1}
  assert report.skipped_per_split == {"train": 1, "validation": 0}
  assert len(builder.as_data_source("train")) == 1
  assert len(builder.as_data_source("validation")) == 1
  # The report survives in the prepared data, for every later reader.
  assert tfds.builder(name, data_dir=data_dir).report == report
