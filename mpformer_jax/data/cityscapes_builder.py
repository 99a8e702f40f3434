"""TFDS builder of Cityscapes fine (`cityscapes`) from the official files (no TF).

One dataset serves the semantic, instance and panoptic tasks: Cityscapes instances do not
overlap, so the panoptic form holds all three. Importing this module registers the builder under
TFDS' own name "cityscapes". TFDS loads its built-in builder of that name (which needs
TensorFlow) on demand, e.g. on a `tfds.builder` call of a name it does not know yet; if that
happened first, importing this module unregisters TFDS' builder so that ours takes the name.
`sources` and `prepare` import this module at once. `python -m mpformer_jax.data.prepare
--dataset cityscapes ...` (or `prepare.prepare`) builds the data from the raw files.

Every example has the features of `synthetic_builder` (the layout the pipeline reads):

- `image`: uint8 `[H, W, 3]`; the original `leftImg8bit` PNG bytes (8-bit RGB), else lossless
  PNG of the RGB conversion (`raw_io.read_image`);
- `panoptic`: uint8 `[H, W, 3]` PNG in COCO's RGB id encoding of the segment ids below;
- `image_id`: int64, the image's position in its split's sorted file list (stable under
  `skip_bad`); `file_name`: its path relative to the manual directory (UTF-8 bytes when read);
- `segments`: `{id, category_id, area, iscrowd}`, category ids being Cityscapes labelIds.

The conversion is cityscapesscripts' `createPanopticImgs.py`, applied to `gtFine_instanceIds`
(value = labelId, or labelId * 1000 + k for an instance): every distinct value is a segment with
that value as its id; labelIds without a trainId (unlabeled, ego vehicle, ..., caravan, trailer)
are void (id 0); thing pixels without an instance (value < 1000: a "group" such as a crowd of
people) form one crowd segment per class (`iscrowd` True); stuff segments are never crowd.

Bad data (an unreadable file, any of image / labelIds / instanceIds missing, sizes that differ,
label values above 33, labelIds and instanceIds disagreeing on a pixel of one of the 19 classes)
raises `raw_io.BadExampleError` (a `ValueError`) naming the file. With `skip_bad=True` such
examples are left out instead, logged, and listed in the build report (`raw_io.BuildReport`, no
dataset counts), which is stored with the data.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow_datasets as tfds

from mpformer_jax.data import cityscapes_categories, panoptic_png, raw_io
from mpformer_jax.data.raw_io import BadExampleError, RawDataError

NAME = "cityscapes"
# TFDS split -> directory name of the official release.
SPLIT_DIRS = {"train": "train", "validation": "val"}
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
# Instance values are labelId * 1000 + k.
INSTANCE_OFFSET = 1000
# labels.py's "license plate" (never drawn into the PNGs, but void if it ever is).
LICENSE_PLATE = -1
_CLASS_IDS = np.array([c["id"] for c in cityscapes_categories.CATEGORIES], np.int64)
_THING_IDS = np.array([c["id"] for c in cityscapes_categories.CATEGORIES if c["isthing"]])


def categories() -> list[dict]:
  """The 19 classes, `{"id", "name", "isthing"}` dicts in label (trainId) order."""
  return [dict(c) for c in cityscapes_categories.CATEGORIES]


# Ours takes the name even if TFDS has loaded its own builder "cityscapes" already.
raw_io.release_tfds_name(NAME)


class Cityscapes(raw_io.RawBuilder):
  """Cityscapes fine annotations (19 classes, 8 things) in the common panoptic layout.

  Constructor arguments besides TFDS' own: `skip_bad` and `progress` (`raw_io.RawBuilder`).
  """

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  SPLITS = SPLIT_DIRS
  IMAGE_FORMAT = "png"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from
  https://www.cityscapes-dataset.com/ and unpack both into the manual directory, so that it holds
  (for split in train, val):
    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>{IMAGE_SUFFIX}
    gtFine/<split>/<city>/<city>_<seq>_<frame>{LABEL_SUFFIX}       (8-bit labelIds)
    gtFine/<split>/<city>/<city>_<seq>_<frame>{INSTANCE_SUFFIX}    (16-bit instanceIds)
  Other files (gtFine_color.png, polygons.json, labelTrainIds.png, the test split) are ignored.
  """

  def _records(self, root, directory: str):
    for index, (key, paths) in enumerate(_triples(root, directory)):
      present = next(p for p in paths if p is not None)
      file_name = str(present.relative_to(root))
      yield key, file_name, functools.partial(_example, *paths, index, file_name)


def _triples(root, directory: str) -> list[tuple[str, tuple]]:
  """`(key, (image, labelIds, instanceIds))` of a split, paths None where missing, sorted.

  Keys are `<city>/<city>_<seq>_<frame>`.

  Raises:
    RawDataError: if the split's image or annotation directory is missing or holds no files.
  """
  image_dir = root / "leftImg8bit" / directory
  gt_dir = root / "gtFine" / directory
  for folder in (image_dir, gt_dir):
    if not folder.is_dir():
      raise RawDataError(folder, "directory missing; expected the Cityscapes layout")
  found = [{}, {}, {}]  # key -> path, for images, labelIds and instanceIds
  for kind, (folder, suffix) in enumerate(
    ((image_dir, IMAGE_SUFFIX), (gt_dir, LABEL_SUFFIX), (gt_dir, INSTANCE_SUFFIX))
  ):
    for city in (d for d in folder.iterdir() if d.is_dir()):
      for path in city.iterdir():
        if path.name.endswith(suffix):
          found[kind][f"{city.name}/{path.name[: -len(suffix)]}"] = path
  keys = sorted(found[0].keys() | found[1].keys() | found[2].keys())
  if not keys:
    raise RawDataError(image_dir, f"no *{IMAGE_SUFFIX} images (and {gt_dir}: no annotations)")
  return [(key, tuple(f.get(key) for f in found)) for key in keys]


def _example(
  image_path, label_path, instance_path, index: int, file_name: str
) -> tuple[dict, dict]:
  """One example and its report stats (`raw_io.Record`).

  Raises:
    BadExampleError: naming the offending file, for any bad-data case of the module docstring.
  """
  present = next(p for p in (image_path, label_path, instance_path) if p is not None)
  for path, what in (
    (image_path, "image"),
    (label_path, "labelIds"),
    (instance_path, "instanceIds"),
  ):
    if path is None:
      raise BadExampleError(present, f"its {what} file is missing")
  image = raw_io.read_image(image_path)
  labels = raw_io.read_label(label_path)
  instances = raw_io.read_label(instance_path)
  for path, array in ((label_path, labels), (instance_path, instances)):
    if array.shape != image.size:
      raise BadExampleError(path, f"size {array.shape} differs from the image size {image.size}")
  instance_labels = np.where(instances >= INSTANCE_OFFSET, instances // INSTANCE_OFFSET, instances)
  for path, values in ((label_path, labels), (instance_path, instance_labels)):
    unknown = np.unique(values[(values > cityscapes_categories.MAX_LABEL_ID) | (values < -1)])
    if unknown.size:
      raise BadExampleError(
        path,
        f"unknown label ids {unknown.tolist()} (Cityscapes labelIds are 0.."
        f"{cityscapes_categories.MAX_LABEL_ID})",
      )
  # Disagreements on void labels do not change the targets; on the 19 classes they would.
  counted = np.isin(labels, _CLASS_IDS) | np.isin(instance_labels, _CLASS_IDS)
  mismatch = counted & (labels != instance_labels)
  if mismatch.any():
    y, x = (int(v[0]) for v in np.nonzero(mismatch))
    raise BadExampleError(
      instance_path,
      f"disagrees with {label_path.name} on {int(mismatch.sum())} pixel(s), e.g. (y={y}, "
      f"x={x}): instance value {int(instances[y, x])}, labelId {int(labels[y, x])}",
    )

  values, inverse, counts = np.unique(instances, return_inverse=True, return_counts=True)
  value_labels = np.where(values >= INSTANCE_OFFSET, values // INSTANCE_OFFSET, values)
  kept = np.isin(value_labels, _CLASS_IDS)
  segments = [
    {
      "id": int(v),
      "category_id": int(c),
      "area": int(n),
      # Thing pixels without an instance id are a group of objects: a crowd region.
      "iscrowd": bool(v < INSTANCE_OFFSET and c in _THING_IDS),
    }
    for v, c, n in zip(values[kept], value_labels[kept], counts[kept], strict=True)
  ]
  pan_ids = np.where(kept, values, 0)[inverse.reshape(instances.shape)]
  example = {
    "image": image.data,
    "panoptic": panoptic_png.encode_png(panoptic_png.id_to_rgb(pan_ids)),
    "image_id": index,
    "file_name": file_name,
    "segments": segments,
  }
  return example, {"reencoded": image.reencoded}
