"""TFDS builder of ADE20K SceneParsing (`ade20k_semantic`) from the official files (no TF).

Importing this module registers the builder, so `tfds.builder("ade20k_semantic", data_dir=...)`
finds a prepared copy. `python -m mpformer_jax.data.prepare --dataset ade20k_semantic ...` (or
`prepare.prepare`) builds it from the raw files (see `MANUAL_DOWNLOAD_INSTRUCTIONS`).

Every example has the features of `synthetic_builder` (the layout the pipeline reads):

- `image`: uint8 `[H, W, 3]`; the original JPEG bytes, or lossless PNG of the RGB conversion of
  the rare other images (e.g. CMYK), as `raw_io.read_image` decides (grayscale JPEGs keep their
  bytes and decode to three equal channels);
- `panoptic`: uint8 `[H, W, 3]` PNG in COCO's RGB id encoding: each pixel's id is its class
  (1..150), and 0 ("other" in the annotation) is void;
- `image_id`: int64, the image's position in its split's sorted file list (stable under
  `skip_bad`); `file_name`: its path relative to the manual directory (read back as UTF-8
  bytes, TFDS' numpy decoding of `Text`);
- `segments`: one per class present, `{id: class, category_id: class, area, iscrowd: False}`.

The semantic task merges segments by class anyway, so one segment per class loses nothing.

Bad data (an unreadable image or annotation, an image without annotation or the reverse, sizes
that differ, a non-single-channel annotation, values above 150) raises
`raw_io.BadExampleError` (a `ValueError`) naming the file. With `skip_bad=True` such examples are
left out instead, logged, and listed in the build report (`raw_io.BuildReport`, no dataset
counts), which is stored with the data.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow_datasets as tfds

from mpformer_jax.data import ade20k_categories, panoptic_png, raw_io
from mpformer_jax.data.raw_io import BadExampleError, RawDataError

NAME = "ade20k_semantic"
ROOT = "ADEChallengeData2016"
# TFDS split -> directory name of the official release.
SPLIT_DIRS = {"train": "training", "validation": "validation"}


def categories() -> list[dict]:
  """The 150 classes, `{"id", "name", "isthing"}` dicts in label order."""
  return [dict(c) for c in ade20k_categories.CATEGORIES]


class Ade20kSemantic(raw_io.RawBuilder):
  """ADE20K SceneParsing (150 classes) in the common panoptic layout.

  Constructor arguments besides TFDS' own: `skip_bad` and `progress` (`raw_io.RawBuilder`).
  """

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  SPLITS = SPLIT_DIRS
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download ADEChallengeData2016.zip (SceneParsing, http://sceneparsing.csail.mit.edu/) and
  unpack it into the manual directory, so that it holds:
    {ROOT}/images/training/ADE_train_%08d.jpg
    {ROOT}/images/validation/ADE_val_%08d.jpg
    {ROOT}/annotations/training/ADE_train_%08d.png      (uint8, 0 = other, 1..150 = classes)
    {ROOT}/annotations/validation/ADE_val_%08d.png
  """

  def _records(self, root, directory: str):
    for index, (key, image_path, label_path) in enumerate(_pairs(root, directory)):
      present = image_path or label_path
      file_name = str(present.relative_to(root))
      yield key, file_name, functools.partial(_example, image_path, label_path, index, file_name)


def _pairs(root, directory: str) -> list[tuple[str, object, object]]:
  """`(key, image path or None, annotation path or None)` of a split, sorted by file stem.

  Raises:
    RawDataError: if the split's image or annotation directory is missing or holds no files.
  """
  image_dir = root / ROOT / "images" / directory
  label_dir = root / ROOT / "annotations" / directory
  for folder in (image_dir, label_dir):
    if not folder.is_dir():
      raise RawDataError(folder, "directory missing; expected the ADEChallengeData2016 layout")
  images = {p.stem: p for p in image_dir.iterdir() if p.name.endswith(".jpg")}
  labels = {p.stem: p for p in label_dir.iterdir() if p.name.endswith(".png")}
  if not images and not labels:
    raise RawDataError(image_dir, f"no .jpg images (and {label_dir}: no .png annotations)")
  return [(stem, images.get(stem), labels.get(stem)) for stem in sorted(images.keys() | labels)]


def _example(image_path, label_path, index: int, file_name: str) -> tuple[dict, dict]:
  """One example and its report stats (`raw_io.Record`).

  Raises:
    BadExampleError: naming the offending file, for any bad-data case of the module docstring.
  """
  if label_path is None:
    raise BadExampleError(image_path, f"annotation missing (no {image_path.stem}.png)")
  if image_path is None:
    raise BadExampleError(label_path, f"image missing (no {label_path.stem}.jpg)")
  image = raw_io.read_image(image_path)
  label = raw_io.read_label(label_path)
  if label.shape != image.size:
    raise BadExampleError(
      label_path, f"annotation size {label.shape} differs from the image size {image.size}"
    )
  values, counts = np.unique(label, return_counts=True)
  unknown = values[values > ade20k_categories.NUM_CLASSES]
  if unknown.size:
    raise BadExampleError(
      label_path,
      f"unknown category ids {unknown.tolist()} (ADE20K has classes 1.."
      f"{ade20k_categories.NUM_CLASSES}, 0 = other)",
    )
  segments = [
    {"id": int(v), "category_id": int(v), "area": int(n), "iscrowd": False}
    for v, n in zip(values, counts, strict=True)
    if v > 0
  ]
  example = {
    "image": image.data,
    "panoptic": panoptic_png.encode_png(panoptic_png.id_to_rgb(label)),
    "image_id": index,
    "file_name": file_name,
    "segments": segments,
  }
  return example, {"reencoded": image.reencoded}
