"""TFDS' own prepared datasets, read in this pipeline's layout (no re-preparation needed).

A user who prepared TFDS' `coco/2017_panoptic` or `scene_parse150` can train on it directly:
`dataset.name` is the TFDS name and `dataset.data_dir` the TFDS data directory. The adapters
here wrap `builder.as_data_source(split)` of TFDS' own builder and turn each element into the
layout our builders write (`synthetic_builder`): `image` uint8 `[H, W, 3]`, `panoptic` uint8
`[H, W, 3]` (COCO's RGB id encoding, 0 = void), `segments` (`id`, `category_id`, `iscrowd`,
`area` sequences), `image_id` and, where TFDS stores it, `file_name`.

- `coco/2017_panoptic` (`CocoPanopticSource`, TFDS' `object_detection/coco.py`): the panoptic
  PNG already is COCO's id encoding and passes through untouched; each `panoptic_objects` entry
  becomes a segment whose category is found by the name of its `ClassLabel` index (the names
  are the panoptic JSON's, stored with the prepared data) in
  `coco_categories.PANOPTIC_CATEGORIES`. Every task works, as with our `coco_panoptic`.
- `scene_parse150` (`SceneParseInstanceSource`): despite the name, TFDS' `annotation` is not
  the 150-class semantic map but ADE20K ChallengeData2017's `annotations_instance` PNG (R =
  instance class 1..100, G = instance id, 0 = no instance). So this dataset serves the instance
  task only (the 100 thing classes of ADE20K-150; there is no stuff): each instance id G > 0 is
  one segment, numbered 1..n by increasing G, whose category is the R-th thing class
  (`ade20k_builder.INSTANCE_TO_CLASS`). Its splits are `train` and `test` (the test split holds
  ADE's validation images). TFDS stores neither an image id nor a file name, so `image_id` is
  the record index in the split.

`prepared_builder` checks what TFDS itself would only report obscurely: the task (see
`metadata.TASK_LIMITS`), that the data is prepared, and that it is stored in a random-access
format (TFDS prepares in tfrecord unless told otherwise; the error gives the `tfds
convert_format` command that adds ArrayRecord files).

Images are decoded here, by PIL converting to RGB as detectron2's `read_image` does, not by
TFDS: TFDS stores the downloaded files' bytes as they are, and its own decoding would give a
CMYK JPEG four channels. 8-bit RGB and grayscale files (grayscale repeated three times) decode
to what TFDS would give.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

# `prepare` registers our builders before any `tfds.builder` call (see `sources`).
from mpformer_jax.data import ade20k_builder, metadata, prepare  # noqa: F401

COCO_PANOPTIC = "coco/2017_panoptic"
SCENE_PARSE150 = "scene_parse150"

# How to prepare each dataset with TFDS, and this project's builder of the same data.
_TFDS_ORIGIN = {
  COCO_PANOPTIC: "COCO 2017 images and panoptic annotations",
  SCENE_PARSE150: "ADE20K ChallengeData2017 images and instance annotations",
}
_OUR_EQUIVALENT = {COCO_PANOPTIC: "coco_panoptic", SCENE_PARSE150: "ade20k_panoptic"}
# TFDS 4.9's `tfds` program imports these when it starts, whatever the command.
_CLI_NEEDS = "the tfds program needs `pip install apache-beam mlcroissant`"


def prepared_builder(name: str, data_dir: str, task: str):
  """TFDS' own builder of `name`, checked to be readable by `ADAPTERS[name]` for `task`.

  Args:
    name: a key of `ADAPTERS`.
    data_dir: the TFDS data directory.
    task: the configured task.

  Raises:
    ValueError: if `name` does not serve `task`, is not prepared in `data_dir` (the message
      says how to prepare it), or is prepared only in a format without random access such as
      tfrecord (the message gives the conversion command).
  """
  metadata.check_task(name, task)
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    ours = _OUR_EQUIVALENT[name]
    raise ValueError(
      f"dataset.name: TFDS' {name!r} is not prepared in {data_dir}. Prepare it with TFDS "
      f"(downloads the {_TFDS_ORIGIN[name]}): `tfds build {name} --data_dir={data_dir} "
      f"--file_format=array_record` ({_CLI_NEEDS}; building TFDS' own datasets on Python >= "
      "3.9 also needs `pip install importlib_resources`); or build this project's equivalent "
      f"from the raw files: `python -m mpformer_jax.data.prepare --dataset {ours} "
      f"--manual_dir RAW --data_dir {data_dir}` and set dataset.name = {ours!r}"
    )
  _restore_alternative_formats(builder.info)
  formats = builder.info.available_file_formats()
  if not formats & tfds.core.FileFormat.with_random_access():
    stored = ", ".join(sorted(f.value for f in formats)) or "an unknown format"
    raise ValueError(
      f"dataset.name: TFDS' {name!r} in {builder.data_dir} is stored as {stored} (TFDS' default "
      "format), which has no random access; the loaders read array_record. Add ArrayRecord "
      "files next to it (in place, nothing is re-downloaded): "
      f"`tfds convert_format --dataset_version_dir={builder.data_dir} "
      f"--out_file_format=array_record` ({_CLI_NEEDS})"
    )
  return builder


def _restore_alternative_formats(info) -> None:
  """Makes `info.available_file_formats()` list the formats its `dataset_info.json` names.

  `tfds convert_format` without `--out_dir` adds the new files next to the old ones and names
  their format in `alternativeFileFormats`, but TFDS 4.9 restores that field only into
  `info.as_proto`, not into the list `available_file_formats()` and `as_data_source` read: a
  converted dataset would stay unreadable.
  """
  known = {f.value: f for f in tfds.core.FileFormat}
  for value in dict.fromkeys(info.as_proto.alternative_file_formats):  # TFDS may repeat them
    if value in known and known[value] not in info.available_file_formats():
      info.add_alternative_file_format(known[value])


# Read every feature as TFDS decodes it, but the image's bytes as they are (`_decode_rgb`).
_DECODERS = {"image": tfds.decode.SkipDecoding()}


def _decode_rgb(data: bytes) -> np.ndarray:
  """uint8 `[H, W, 3]` pixels of an encoded image."""
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


class CocoPanopticSource:
  """`coco/2017_panoptic` elements in our layout (module docstring); `len()` and `[i]`.

  Args:
    source: TFDS' random-access source of one split (elements with `image` (encoded bytes),
      `image/id`, `image/filename`, `panoptic_image`, `panoptic_objects`).
    label_names: the `panoptic_objects/label` ClassLabel names of the prepared data.

  Raises:
    ValueError: for a label name that is not a COCO panoptic category.
  """

  def __init__(self, source, label_names):
    by_name = {c["name"]: c["id"] for c in metadata.categories_of(COCO_PANOPTIC)}
    unknown = [n for n in label_names if n not in by_name]
    if unknown:
      raise ValueError(
        f"{COCO_PANOPTIC!r}: label name {unknown[0]!r} of the prepared data is not a COCO "
        f"panoptic category (mpformer_jax.data.coco_categories); unknown: {unknown}"
      )
    self._source = source
    # ClassLabel index -> our category id, one lookup per segment.
    self._category_ids = np.array([by_name[n] for n in label_names], np.int64)

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:  # grain checks it when a loader's state is restored
    return f"CocoPanopticSource({self._source!r})"

  def __getitem__(self, index: int) -> dict:
    element = self._source[index]
    objects = element["panoptic_objects"]
    # TFDS decodes a Sequence to lists of numpy scalars (empty lists for an image without
    # segments): `reshape(-1)` gives every column the same 1-D shape.
    labels = np.asarray(objects["label"], np.int64).reshape(-1)
    return {
      "image": _decode_rgb(element["image"]),
      "panoptic": element["panoptic_image"],  # already COCO's RGB id encoding
      "image_id": element["image/id"],
      "file_name": element["image/filename"],
      "segments": {
        "id": np.asarray(objects["id"], np.int64).reshape(-1),
        "category_id": self._category_ids[labels],
        "iscrowd": np.asarray(objects["is_crowd"], bool).reshape(-1),
        "area": np.asarray(objects["area"], np.int64).reshape(-1),
      },
    }


class SceneParseInstanceSource:
  """`scene_parse150` elements as ADE20K instance segments (module docstring); `len()`, `[i]`.

  Args:
    source: TFDS' random-access source of one split (elements with `image`, encoded bytes,
      and `annotation`, the instance PNG as uint8 `[H, W, 3]`).
    split: the split's name, for errors.
  """

  def __init__(self, source, split: str):
    self._source = source
    self._split = split

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    return f"SceneParseInstanceSource({self._source!r})"

  def __getitem__(self, index: int) -> dict:
    element = self._source[index]
    image, annotation = _decode_rgb(element["image"]), element["annotation"]
    where = f"{SCENE_PARSE150!r} split {self._split!r} example {index}"
    if annotation.shape[:2] != image.shape[:2] or annotation.shape[2:] != (3,):
      raise ValueError(
        f"{where}: annotation of shape {annotation.shape} does not match the image "
        f"{image.shape} (expected the RGB instance PNG of the same size)"
      )
    classes, ids = annotation[..., 0], annotation[..., 1]
    # Pixel count of every (G, R) pair: one linear pass, and G-major order puts an instance's
    # pairs together.
    pairs = np.bincount((ids.astype(np.int64) << 8 | classes).ravel(), minlength=256 * 256)
    pairs = pairs.reshape(256, 256)[1:]  # [G - 1, R]; G = 0 is "no instance", whatever R
    present = pairs > 0
    instance_ids = np.flatnonzero(present.any(axis=1)) + 1  # increasing G
    several = instance_ids[present[instance_ids - 1].sum(axis=1) > 1]
    if several.size:
      g = int(several[0])
      raise ValueError(
        f"{where}: instance {g} has classes {np.flatnonzero(present[g - 1]).tolist()} "
        "(expected one)"
      )
    instance_classes = present[instance_ids - 1].argmax(axis=1)
    bad = (instance_classes < 1) | (instance_classes > ade20k_builder.NUM_INSTANCE_CLASSES)
    if bad.any():
      raise ValueError(
        f"{where}: instance {int(instance_ids[bad][0])} has class {int(instance_classes[bad][0])}"
        f" (instance classes are 1..{ade20k_builder.NUM_INSTANCE_CLASSES})"
      )
    # Segment ids 1..n by increasing G (at most 255 instances, so one PNG channel holds them).
    new_id = np.zeros(256, np.uint8)
    new_id[instance_ids] = np.arange(1, len(instance_ids) + 1)
    panoptic = np.zeros(annotation.shape, np.uint8)
    panoptic[..., 0] = new_id[ids]
    return {
      "image": image,
      "panoptic": panoptic,
      "image_id": np.int64(index),
      "segments": {
        "id": np.arange(1, len(instance_ids) + 1, dtype=np.int64),
        "category_id": ade20k_builder.INSTANCE_TO_CLASS[instance_classes],
        "iscrowd": np.zeros(len(instance_ids), bool),
        "area": pairs[instance_ids - 1].sum(axis=1),
      },
    }


def _coco_panoptic(builder, split: str) -> CocoPanopticSource:
  names = builder.info.features["panoptic_objects"]["label"].names
  return CocoPanopticSource(builder.as_data_source(split=split, decoders=_DECODERS), names)


def _scene_parse150(builder, split: str) -> SceneParseInstanceSource:
  return SceneParseInstanceSource(builder.as_data_source(split=split, decoders=_DECODERS), split)


# TFDS name -> `adapter(builder, split)`: the split's source in our layout. `metadata` has a
# category table for each.
ADAPTERS = {COCO_PANOPTIC: _coco_panoptic, SCENE_PARSE150: _scene_parse150}
