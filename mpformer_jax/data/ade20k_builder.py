"""TFDS builders of ADE20K SceneParsing from the official files (no TF).

Two datasets over the same images (importing this module registers both, so
`tfds.builder(name, data_dir=...)` finds a prepared copy; `python -m mpformer_jax.data.prepare
--dataset NAME ...` or `prepare.prepare` builds them, see each `MANUAL_DOWNLOAD_INSTRUCTIONS`):

- `ade20k_semantic` (`Ade20kSemantic`): the 150-class semantic annotations as they are, for the
  semantic task;
- `ade20k_panoptic` (`Ade20kPanoptic`): Mask2Former's panoptic ground truth
  (`datasets/prepare_ade20k_pan_seg.py`), made from the semantic annotations plus the instance
  annotations (`annotations_instance.tar`), for the panoptic (150 classes) and instance (the 100
  thing classes) tasks. Mask2Former's `prepare_ade20k_ins_seg.py` makes the same instance masks,
  so this one dataset serves both (and the semantic task, merging its segments per class).

Every example has the features of `synthetic_builder` (the layout the pipeline reads):

- `image`: uint8 `[H, W, 3]`; the original JPEG bytes, or lossless PNG of the RGB conversion of
  the rare other images (e.g. CMYK), as `raw_io.read_image` decides (grayscale JPEGs keep their
  bytes and decode to three equal channels);
- `panoptic`: uint8 `[H, W, 3]` PNG in COCO's RGB id encoding of the segment ids below (0 is
  void);
- `image_id`: int64, the image's position in its split's sorted file list (stable under
  `skip_bad`); `file_name`: the image's path relative to the manual directory (read back as
  UTF-8 bytes, TFDS' numpy decoding of `Text`);
- `segments`: `{id, category_id, area, iscrowd}`, category ids being the annotation values
  1..150; `iscrowd` is always False (ADE20K has no crowd regions);
- `ade20k_panoptic` only: `semantic`, uint8 `[H, W, 1]`, the SceneParsing annotation itself
  (0 = void, 1..150), which the reference's semantic metrics of panoptic runs score against.

`ade20k_semantic`: each pixel's id is its class (1..150), and 0 ("other" in the annotation) is
void; one segment per class present, `{id: class, category_id: class, ...}`. The semantic task
merges segments by class anyway, so one segment per class loses nothing.

`ade20k_panoptic`, the reference's conversion:

1. stuff: every stuff class (`isthing` False in `ade20k_categories`) present in the semantic PNG
   is one segment of its pixels. Semantic pixels of thing classes are not used: they stay void
   unless an instance covers them (the build report counts them, `thing_pixels_without_instance`);
2. things: every instance id G > 0 of the instance PNG (uint8 RGB: R = instance class 1..100,
   G = instance id within the image, B unused) is one segment of the pixels with that G, whose
   category is the R-th thing class in increasing id order (Mask2Former's
   `ade20k_instance_catid_mapping.txt`); pixels with G = 0 belong to no instance, whatever
   their R. Instances are pasted after the stuff and overwrite it where the two annotations
   overlap (the reference notes they overlap a little); the report counts the overwritten
   pixels (`stuff_pixels_overwritten`) and the stuff segments left without pixels, which are
   removed (`stuff_segments_emptied`);
3. segment ids are 1..n: stuff by increasing class, then instances by increasing G (the
   reference's ids are colours from panopticapi's `IdGenerator`, with no meaning of their own);
   `area` is the segment's pixel count in the stored map (the reference records a stuff
   segment's area before the paste, and keeps the emptied ones).

Bad data raises `raw_io.BadExampleError` (a `ValueError`) naming the file: an unreadable image
or annotation, an image without annotation or the reverse (or, for `ade20k_panoptic`, without
instance annotation), sizes that differ, a non-single-channel semantic annotation, semantic
values above 150; for `ade20k_panoptic` also an instance PNG that is not RGB, an instance whose
pixels carry more than one class, and an instance class outside 1..100 (the reference crashes on
these). With `skip_bad=True` such examples are left out instead, logged, and listed in the build
report (`raw_io.BuildReport`; its `counts` are the ones above for `ade20k_panoptic`, none for
`ade20k_semantic`), which is stored with the data.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow_datasets as tfds

from mpformer_jax.data import ade20k_categories, panoptic_png, raw_io
from mpformer_jax.data.raw_io import BadExampleError, RawDataError

NAME = "ade20k_semantic"
PANOPTIC_NAME = "ade20k_panoptic"
ROOT = "ADEChallengeData2016"
# TFDS split -> directory name of the official release.
SPLIT_DIRS = {"train": "training", "validation": "validation"}
# The instance annotations' directory (from annotations_instance.tar), next to `annotations`.
INSTANCE_DIR = "annotations_instance"
# Instance classes (R channel) are 1..NUM_INSTANCE_CLASSES; 0 is "no instance".
NUM_INSTANCE_CLASSES = 100

# bool [151]: annotation value -> whether it is a thing class (value 0, "other", is not).
_CLASS_ISTHING = np.array([False] + [c["isthing"] for c in ade20k_categories.CATEGORIES])
# Instance class k (1..100) -> semantic class id: the k-th thing class in increasing id order,
# which is what Mask2Former's `ade20k_instance_catid_mapping.txt` lists. Index 0 is unused.
INSTANCE_TO_CLASS = np.array([0, *np.flatnonzero(_CLASS_ISTHING)], np.int64)  # [101]
assert len(INSTANCE_TO_CLASS) == NUM_INSTANCE_CLASSES + 1, "the table must have 100 things"


def categories() -> list[dict]:
  """The 150 classes, `{"id", "name", "isthing"}` dicts in label order."""
  return [dict(c) for c in ade20k_categories.CATEGORIES]


class Ade20kSemantic(raw_io.RawBuilder):
  """ADE20K SceneParsing (150 classes) in the common panoptic layout, one segment per class.

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
    return _records(root, directory, instances=False)


class Ade20kPanoptic(raw_io.RawBuilder):
  """ADE20K panoptic (150 classes, 100 things), Mask2Former's conversion (module docstring).

  Constructor arguments besides TFDS' own: `skip_bad` and `progress` (`raw_io.RawBuilder`).
  """

  name = PANOPTIC_NAME
  VERSION = tfds.core.Version("1.0.0")
  # The SceneParsing label map too: the reference scores ADE20K panoptic runs' mIoU against it
  # (`ade20k_panoptic_val`'s `sem_seg_file_name`), and it labels the thing pixels that no
  # instance covers, which the panoptic map leaves void.
  SEMANTIC = True
  SPLITS = SPLIT_DIRS
  COUNTS = {
    "stuff_pixels_overwritten": 0,
    "stuff_segments_emptied": 0,
    "thing_pixels_without_instance": 0,
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download ADEChallengeData2016.zip (SceneParsing, http://sceneparsing.csail.mit.edu/) and its
  instance annotations, annotations_instance.tar (same site), and unpack both into the manual
  directory, so that it holds:
    {ROOT}/images/training/ADE_train_%08d.jpg
    {ROOT}/images/validation/ADE_val_%08d.jpg
    {ROOT}/annotations/training/ADE_train_%08d.png      (uint8, 0 = other, 1..150 = classes)
    {ROOT}/annotations/validation/ADE_val_%08d.png
    {ROOT}/{INSTANCE_DIR}/training/ADE_train_%08d.png   (uint8 RGB: R = instance class
    {ROOT}/{INSTANCE_DIR}/validation/ADE_val_%08d.png     1..100, G = instance id, 0 = none)
  """

  def _records(self, root, directory: str):
    return _records(root, directory, instances=True)


def _records(root, directory: str, instances: bool):
  """The `raw_io.Record`s of a split, for `ade20k_panoptic` if `instances`."""
  make = _panoptic_example if instances else _semantic_example
  for index, (key, paths) in enumerate(_listing(root, directory, instances)):
    present = next(p for p in paths if p is not None)
    file_name = str(present.relative_to(root))
    yield key, file_name, functools.partial(make, *paths, index, file_name)


def _listing(root, directory: str, instances: bool) -> list[tuple[str, tuple]]:
  """`(key, (image, annotation[, instance annotation]))` of a split, sorted by file stem.

  Paths are None where a file is missing; keys are the file stems.

  Raises:
    RawDataError: if one of the split's directories is missing, or none holds any file.
  """
  folders = [root / ROOT / "images" / directory, root / ROOT / "annotations" / directory]
  if instances:
    folders.append(root / ROOT / INSTANCE_DIR / directory)
  for folder in folders:
    if not folder.is_dir():
      layout = f" with {INSTANCE_DIR} (annotations_instance.tar)" if instances else ""
      raise RawDataError(folder, f"directory missing; expected the {ROOT} layout{layout}")
  found = [
    {p.stem: p for p in folder.iterdir() if p.name.endswith(suffix)}
    for folder, suffix in zip(folders, (".jpg", ".png", ".png"), strict=False)
  ]
  keys = sorted(set().union(*found))
  if not keys:
    raise RawDataError(folders[0], f"no .jpg images (and {folders[1]}: no .png annotations)")
  return [(key, tuple(f.get(key) for f in found)) for key in keys]


def _read_semantic(image_path, label_path) -> tuple[raw_io.StoredImage, np.ndarray]:
  """The stored image and the int64 `[H, W]` semantic annotation (0..150), checked.

  Raises:
    BadExampleError: for a missing, unreadable or non-single-channel file, different sizes or
      annotation values above 150.
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
  unknown = np.unique(label[label > ade20k_categories.NUM_CLASSES])
  if unknown.size:
    raise BadExampleError(
      label_path,
      f"unknown category ids {unknown.tolist()} (ADE20K has classes 1.."
      f"{ade20k_categories.NUM_CLASSES}, 0 = other)",
    )
  return image, label


def _example(image: raw_io.StoredImage, pan_ids, segments, index, file_name) -> dict:
  return {
    "image": image.data,
    "panoptic": panoptic_png.encode_png(panoptic_png.id_to_rgb(pan_ids)),
    "image_id": index,
    "file_name": file_name,
    "segments": segments,
  }


def _semantic_example(image_path, label_path, index: int, file_name: str) -> tuple[dict, dict]:
  """One `ade20k_semantic` example and its report stats (`raw_io.Record`).

  Raises:
    BadExampleError: naming the offending file, for any bad-data case of the module docstring.
  """
  image, label = _read_semantic(image_path, label_path)
  values, counts = np.unique(label, return_counts=True)
  segments = [
    {"id": int(v), "category_id": int(v), "area": int(n), "iscrowd": False}
    for v, n in zip(values, counts, strict=True)
    if v > 0
  ]
  return _example(image, label, segments, index, file_name), {"reencoded": image.reencoded}


def _read_instances(path, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """int64 `[H, W]` instance classes (R) and instance ids (G) of an instance PNG.

  Raises:
    BadExampleError: naming `path` if it is unreadable, not RGB, or not of `size` `(H, W)`.
  """
  _, png = raw_io.decode(path, "instance annotation")
  # The reference reads R and G as uint8 channels; any other layout would be misread.
  if png.mode != "RGB":
    raise BadExampleError(
      path, f"expected an RGB instance annotation PNG (R = class, G = id), got PIL mode {png.mode}"
    )
  rgb = np.asarray(png).astype(np.int64)
  if rgb.shape[:2] != size:
    raise BadExampleError(
      path, f"instance annotation size {rgb.shape[:2]} differs from the image size {size}"
    )
  return rgb[..., 0], rgb[..., 1]


def _instance_classes(path, classes: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, ...]:
  """The distinct instance ids G > 0 `[T]` (increasing) and the semantic class of each `[T]`.

  Args:
    path: the instance PNG, for errors.
    classes, ids: int64 `[H, W]` R and G channels.

  Raises:
    BadExampleError: naming `path` for an instance with pixels of several classes, or of a
      class outside 1..100.
  """
  on = ids > 0
  # Distinct (G, R) pairs, G-major: an instance with one class has one pair.
  pairs = np.unique(ids[on] * 256 + classes[on])
  pair_ids, pair_classes = pairs // 256, pairs % 256
  instance_ids, first, counts = np.unique(pair_ids, return_index=True, return_counts=True)
  if np.any(counts > 1):
    g = instance_ids[counts > 1][0]
    found = pair_classes[pair_ids == g].tolist()
    raise BadExampleError(path, f"instance {int(g)} has classes {found} (expected one)")
  instance_classes = pair_classes[first]
  bad = (instance_classes < 1) | (instance_classes > NUM_INSTANCE_CLASSES)
  if bad.any():
    g, r = int(instance_ids[bad][0]), int(instance_classes[bad][0])
    raise BadExampleError(
      path, f"instance {g} has class {r} (instance classes are 1..{NUM_INSTANCE_CLASSES})"
    )
  return instance_ids, INSTANCE_TO_CLASS[instance_classes]


def _panoptic_example(
  image_path, label_path, instance_path, index: int, file_name: str
) -> tuple[dict, dict]:
  """One `ade20k_panoptic` example and its report stats (`raw_io.Record`).

  Raises:
    BadExampleError: naming the offending file, for any bad-data case of the module docstring.
  """
  image, label = _read_semantic(image_path, label_path)
  if instance_path is None:
    expected = f"{INSTANCE_DIR}/{image_path.parent.name}/{image_path.stem}.png"
    raise BadExampleError(image_path, f"instance annotation missing (no {expected})")
  classes, ids = _read_instances(instance_path, image.size)
  instance_ids, instance_categories = _instance_classes(instance_path, classes, ids)

  # Candidate segments 1..S are the stuff classes present (increasing), S+1..S+T the instances
  # (increasing G); `candidate` is each pixel's, 0 for void.
  is_stuff = (label > 0) & ~_CLASS_ISTHING[label]
  stuff_classes = np.unique(label[is_stuff])
  candidate = np.zeros(label.shape, np.int64)
  candidate[is_stuff] = np.searchsorted(stuff_classes, label[is_stuff]) + 1
  on = ids > 0
  candidate[on] = len(stuff_classes) + 1 + np.searchsorted(instance_ids, ids[on])
  category = np.concatenate([[0], stuff_classes, instance_categories])
  area = np.bincount(candidate.ravel(), minlength=len(category))
  # Every instance keeps its pixels; a stuff class may lose all of them to the paste.
  kept = area > 0
  kept[0] = False
  # Renumber the kept candidates 1..n, in candidate order.
  new_id = np.where(kept, np.cumsum(kept), 0)
  segments = [
    {"id": int(new_id[c]), "category_id": int(category[c]), "area": int(area[c]), "iscrowd": False}
    for c in np.flatnonzero(kept)
  ]
  stats = {
    "reencoded": image.reencoded,
    "stuff_pixels_overwritten": int(np.sum(is_stuff & on)),
    "stuff_segments_emptied": int(len(stuff_classes) - np.sum(kept[1 : len(stuff_classes) + 1])),
    "thing_pixels_without_instance": int(np.sum(_CLASS_ISTHING[label] & ~on)),
  }
  example = _example(image, new_id[candidate], segments, index, file_name)
  example["semantic"] = panoptic_png.encode_png(label.astype(np.uint8))
  return example, stats
