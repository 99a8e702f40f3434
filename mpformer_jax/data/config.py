"""Dataset configuration: defaults and validation at the edge (errors name `dataset.<field>`).

The data layer reads these fields by attribute, so any object with them works; the overall
config is expected to hold this under `config.dataset`.
"""

from __future__ import annotations

import os
import types

import ml_collections

from mpformer_jax.data.metadata import check_task, dataset_metadata
from mpformer_jax.data.targets import TASKS

SIZE_MULTIPLE = 32  # the network's coarsest stride: image sizes must divide by it
AUGMENTATIONS = ("lsj", "short_side")  # see `default_dataset_config`


def default_dataset_config() -> ml_collections.ConfigDict:
  """The synthetic panoptic dataset with Mask2Former's augmentation at 128 x 128.

  Also importable as `mpformer_jax.data.pipeline.default_dataset_config`.

  Fields:
    name: TFDS dataset name. "synthetic_shapes" is built on first use. The real datasets
      ("coco_panoptic", "coco_instance", "ade20k_semantic", "ade20k_panoptic", "cityscapes")
      are prepared from their raw files with `python -m mpformer_jax.data.prepare --dataset
      NAME --manual_dir RAW --data_dir DATA_DIR`. Any other name must be prepared in `data_dir`
      with the same features (image, panoptic, image_id, segments) and have category metadata
      in `mpformer_jax.data.metadata`. TFDS' own "coco/2017_panoptic" and "scene_parse150"
      (instance task only), prepared with TFDS in ArrayRecord, are read as they are
      (`mpformer_jax.data.tfds_sources`).
    data_dir: TFDS data directory (`~` is expanded); default `$TFDS_DATA_DIR` or
      `~/tensorflow_datasets`.
    task: "panoptic", "instance" or "semantic" (see `mpformer_jax.data.targets`).
    num_classes: the number of classes of `name` for `task` (8 for this default; 5 for the
      synthetic instance task), for the model config to copy. The loaders check it against the
      dataset and fail on a mismatch, so change it together with `name` / `task` (None: take the
      dataset's).
    crop_size: `(H, W)` of training images, multiples of 32.
    augmentation: the training augmentation, `"lsj"` or `"short_side"`:
      - `"lsj"`: random flip, resize so the image fits into `scale * crop_size` (`scale`
        uniform in `[min_scale, max_scale]`), random crop to `crop_size`, pad to `crop_size`.
        With `min_scale, max_scale = 0.1, 2.0` and a 1024 x 1024 crop this is Mask2Former's
        COCO large-scale jitter (detectron2's `ResizeScale` + `FixedSizeCrop`).
      - `"short_side"` (ADE20K / Cityscapes): resize the short side to a random choice of
        `short_side.sizes` (long side at most `short_side.max_size`), random crop to
        `crop_size` (clipped to the image) whose largest category covers less than
        `short_side.single_category_max_area` of it, SSD colour jitter, random flip, pad to
        `crop_size` (`mpformer_jax.data.transforms.short_side_transform`).
    min_scale, max_scale: `"lsj"` scale jitter range (relative to fitting the image into
      `crop_size`); unused by `"short_side"`.
    short_side: the `"short_side"` augmentation's settings (validated only when it is selected):
      - `sizes`: short-side lengths, one chosen uniformly per image (detectron2's
        `ResizeShortestEdge(..., "choice")`);
      - `max_size`: longest side after the resize;
      - `single_category_max_area`: `RandomCrop_CategoryAreaConstraint`'s limit on the share of
        the crop one category may cover (1.0: no constraint, plain random crop), in `(0, 1]`.
        Below 1.0, up to 10 random windows are tried and the first holding more than one
        category, none covering this share or more of the non-void pixels, is taken (else
        the last one tried). Categories are counted per pixel from the panoptic map (crowd
        segments count as their category, void is ignored), whatever the task;
      - `ignore_label`: the semantic label of void pixels, which the area constraint ignores
        (the reference's `IGNORE_VALUE`, 255); it must not be a category id of the dataset;
      - `color_jitter`: Mask2Former's `ColorAugSSDTransform` (brightness, contrast, saturation,
        hue, each with probability 0.5; `mpformer_jax.data.color_jitter`).
    flip: random horizontal flips.
    max_gt: target slots per training image; extra segments are dropped and counted.
    filter_empty: instance task only: train only on images with at least one non-crowd thing
      segment, as detectron2's `DATALOADER.FILTER_EMPTY_ANNOTATIONS` (on by default) does for
      the instance datasets of Mask2Former (panoptic and semantic datasets are never filtered).
      The train loader scans the split's segment lists once and logs how many images it left
      out (`TrainIterator.num_filtered_empty`).
    eval_size: `(H, W)` canvas of evaluation images, multiples of 32: images are padded to
      it. Without a test resize, larger images shrink to fit; with one, it must hold every
      resized image (an image that does not fit is an error naming it).
    eval_short_side, eval_max_size: the test resize: short side to `eval_short_side`, long side
      at most `eval_max_size` (detectron2's `ResizeShortestEdge` at test time, sides rounded
      with `int(x + 0.5)`; id maps resized by nearest neighbour). 0 (the default) keeps the
      images' own size.
    eval_original_size: `(H, W)` canvas that holds every evaluation image at its original size
      (empty: `eval_size`). As in the reference, predictions are resized back to the original
      size (detectron2's `sem_seg_postprocess`) and scored against the original ground truth;
      an image larger than this canvas is an error naming it. A canvas no larger than the
      dataset's biggest image keeps this step cheap (COCO: (640, 640)).
    eval_max_segments: slots for the raw ground truth of an evaluation image; an image with
      more segments is an error, since dropping ground truth would bias the metrics.
    worker_count: grain worker processes (0 = load in the main process).
    worker_buffer_size: batches each worker prepares ahead.
    train_split, eval_split: split names.
    synthetic: size of the synthetic dataset (`image_size`, `num_train`, `num_validation`,
      `max_instances`, `seed`), used only when `name == "synthetic_shapes"`.
  """
  data_dir = os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets"))
  name, task = "synthetic_shapes", "panoptic"
  num_classes = dataset_metadata(types.SimpleNamespace(name=name, task=task, num_classes=None))
  return ml_collections.ConfigDict(
    {
      "name": name,
      "data_dir": data_dir,
      "task": task,
      "num_classes": num_classes.num_classes,
      "crop_size": (128, 128),
      "augmentation": "lsj",
      "min_scale": 0.5,
      "max_scale": 2.0,
      "short_side": {
        "sizes": (),
        "max_size": 0,
        "single_category_max_area": 1.0,
        "ignore_label": 255,
        "color_jitter": False,
      },
      "flip": True,
      "max_gt": 16,
      "filter_empty": True,
      "eval_size": (128, 128),
      "eval_short_side": 0,
      "eval_max_size": 0,
      "eval_original_size": (),
      "eval_max_segments": 32,
      "worker_count": 0,
      "worker_buffer_size": 2,
      "train_split": "train",
      "eval_split": "validation",
      "synthetic": {
        "image_size": (128, 128),
        "num_train": 512,
        "num_validation": 64,
        "max_instances": 6,
        "seed": 0,
      },
    }
  )


def _field(config, name: str, prefix: str = "dataset"):
  if not hasattr(config, name):
    raise ValueError(f"{prefix}.{name}: missing")
  return getattr(config, name)


def _positive_int(config, name: str, prefix: str = "dataset", minimum: int = 1) -> int:
  value = _field(config, name, prefix)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{prefix}.{name}: expected an integer >= {minimum}, got {value!r}")
  return value


def _size(config, name: str, multiple: int = 1, prefix: str = "dataset") -> tuple[int, int]:
  value = _field(config, name, prefix)
  try:
    h, w = (int(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"{prefix}.{name}: expected (height, width), got {value!r}") from None
  if h <= 0 or w <= 0 or h % multiple or w % multiple:
    raise ValueError(
      f"{prefix}.{name}: expected positive sizes divisible by {multiple}, got {value!r}"
    )
  return h, w


def eval_original_canvas(config) -> tuple[int, int]:
  """The `(H, W)` canvas of evaluation ground truth and scored predictions (original sizes)."""
  size = tuple(config.eval_original_size) or tuple(config.eval_size)
  return int(size[0]), int(size[1])


def validate_dataset_config(config) -> None:
  """Checks every field `default_dataset_config` documents.

  Raises:
    ValueError: naming the first offending field as `dataset.<field>`.
  """
  for name in ("name", "data_dir", "train_split", "eval_split"):
    value = _field(config, name)
    if not isinstance(value, str) or not value:
      raise ValueError(f"dataset.{name}: expected a non-empty string, got {value!r}")
  if _field(config, "task") not in TASKS:
    raise ValueError(f"dataset.task: expected one of {TASKS}, got {config.task!r}")
  check_task(config.name, config.task)
  if _field(config, "num_classes") is not None:
    _positive_int(config, "num_classes")
  _size(config, "crop_size", SIZE_MULTIPLE)
  _size(config, "eval_size", SIZE_MULTIPLE)
  if len(_field(config, "eval_original_size")):
    _size(config, "eval_original_size")
  min_scale, max_scale = _field(config, "min_scale"), _field(config, "max_scale")
  if not 0 < min_scale <= max_scale:
    raise ValueError(
      f"dataset.min_scale, dataset.max_scale: expected 0 < min_scale <= max_scale, "
      f"got {min_scale!r}, {max_scale!r}"
    )
  _validate_augmentation(config)
  for name in ("flip", "filter_empty"):
    if not isinstance(_field(config, name), bool):
      raise ValueError(f"dataset.{name}: expected a bool, got {getattr(config, name)!r}")
  _positive_int(config, "max_gt")
  _positive_int(config, "eval_max_segments")
  _validate_eval_resize(config)
  _positive_int(config, "worker_count", minimum=0)
  _positive_int(config, "worker_buffer_size")
  if config.name == "synthetic_shapes":
    synthetic = _field(config, "synthetic")
    _size(synthetic, "image_size", prefix="dataset.synthetic")
    _positive_int(synthetic, "num_train", "dataset.synthetic")
    _positive_int(synthetic, "num_validation", "dataset.synthetic")
    _positive_int(synthetic, "max_instances", "dataset.synthetic")
    _positive_int(synthetic, "seed", "dataset.synthetic", minimum=0)


def _validate_augmentation(config) -> None:
  augmentation = _field(config, "augmentation")
  if augmentation not in AUGMENTATIONS:
    raise ValueError(f"dataset.augmentation: expected one of {AUGMENTATIONS}, got {augmentation!r}")
  if augmentation != "short_side":
    return
  prefix = "dataset.short_side"
  short_side = _field(config, "short_side")
  sizes = _field(short_side, "sizes", prefix)
  if (
    isinstance(sizes, str | bytes)
    or not sizes
    or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)
  ):
    raise ValueError(f"{prefix}.sizes: expected a non-empty tuple of positive ints, got {sizes!r}")
  max_size = _positive_int(short_side, "max_size", prefix)
  if max_size < max(sizes):
    raise ValueError(
      f"{prefix}.max_size: expected at least the largest short side {max(sizes)}, got {max_size}"
    )
  area = _field(short_side, "single_category_max_area", prefix)
  if isinstance(area, bool) or not isinstance(area, int | float) or not 0 < area <= 1:
    raise ValueError(
      f"{prefix}.single_category_max_area: expected a number in (0, 1], got {area!r}"
    )
  _positive_int(short_side, "ignore_label", prefix, minimum=0)
  if not isinstance(_field(short_side, "color_jitter", prefix), bool):
    raise ValueError(f"{prefix}.color_jitter: expected a bool, got {short_side.color_jitter!r}")


def _validate_eval_resize(config) -> None:
  short = _positive_int(config, "eval_short_side", minimum=0)
  longest = _positive_int(config, "eval_max_size", minimum=0)
  if not short:
    return
  if longest < short:
    raise ValueError(
      f"dataset.eval_max_size: expected at least dataset.eval_short_side = {short}, got {longest}"
    )
  # A canvas narrower than the short side would shrink every image: surely a mistake.
  if min(_size(config, "eval_size")) < short:
    raise ValueError(
      f"dataset.eval_size: {tuple(config.eval_size)} cannot hold the short side "
      f"dataset.eval_short_side = {short}"
    )
