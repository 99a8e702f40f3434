"""Category metadata of the supported datasets and the training label space of each task."""

from __future__ import annotations

import dataclasses
import importlib

# Dataset name -> (module, attribute) of its categories (`{"id", "name", "isthing"}` dicts, in
# the order of the training labels). A new dataset needs an entry here; TFDS' own metadata does
# not say which classes are things. The tables live in small modules without TFDS, imported on
# first use.
CATEGORY_TABLES = {
  "synthetic_shapes": ("mpformer_jax.data.synthetic_shapes", "CATEGORIES"),
  "coco_panoptic": ("mpformer_jax.data.coco_categories", "PANOPTIC_CATEGORIES"),
  "coco_instance": ("mpformer_jax.data.coco_categories", "INSTANCE_CATEGORIES"),
  "ade20k_semantic": ("mpformer_jax.data.ade20k_categories", "CATEGORIES"),
  "ade20k_panoptic": ("mpformer_jax.data.ade20k_categories", "CATEGORIES"),
  "cityscapes": ("mpformer_jax.data.cityscapes_categories", "CATEGORIES"),
  # TFDS' own datasets, read through `tfds_sources`. scene_parse150 has instance annotations
  # only, so it serves the instance task, whose labels are the table's 100 things in id order:
  # label k - 1 is instance class k of its PNGs.
  "coco/2017_panoptic": ("mpformer_jax.data.coco_categories", "PANOPTIC_CATEGORIES"),
  "scene_parse150": ("mpformer_jax.data.ade20k_categories", "CATEGORIES"),
}

# Datasets that serve only some tasks: name -> (tasks, why not the others).
TASK_LIMITS = {
  "scene_parse150": (
    ("instance",),
    "TFDS' scene_parse150 holds ADE20K's instance annotations only (its `annotation` is the "
    "annotations_instance PNG: the 100 thing classes, no stuff or semantic labels); for the "
    "semantic or panoptic task prepare this project's ade20k_semantic or ade20k_panoptic "
    "(python -m mpformer_jax.data.prepare)",
  ),
}


def check_task(name: str, task: str) -> None:
  """Raises a ValueError if dataset `name` cannot serve `task` (`TASK_LIMITS`)."""
  if name in TASK_LIMITS:
    tasks, why = TASK_LIMITS[name]
    if task not in tasks:
      raise ValueError(
        f"dataset.task: {name!r} serves only the {' / '.join(tasks)} task, got {task!r}: {why}"
      )


def categories_of(name: str) -> tuple[dict, ...]:
  """The categories of dataset `name` (copies).

  Raises:
    ValueError: for a dataset without a category table.
  """
  if name not in CATEGORY_TABLES:
    raise ValueError(
      f"dataset.name: no category metadata for {name!r}; known: {sorted(CATEGORY_TABLES)}"
    )
  module, attribute = CATEGORY_TABLES[name]
  return tuple(dict(c) for c in getattr(importlib.import_module(module), attribute))


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
  """Categories of a dataset and their contiguous training labels for one task.

  Attributes:
    name: dataset name.
    task: "panoptic", "instance" or "semantic".
    categories: every category of the dataset.
    label_category_ids: dataset category id of each training label `0..K-1`. The instance task
      labels things only (as Mask2Former's COCO instance models do); the others label all.
  """

  name: str
  task: str
  categories: tuple[dict, ...]
  label_category_ids: tuple[int, ...]

  @property
  def num_classes(self) -> int:
    return len(self.label_category_ids)

  @property
  def category_to_label(self) -> dict[int, int]:
    return {c: i for i, c in enumerate(self.label_category_ids)}

  @property
  def thing_category_ids(self) -> tuple[int, ...]:
    return tuple(c["id"] for c in self.categories if c["isthing"])

  @property
  def label_names(self) -> tuple[str, ...]:
    names = {c["id"]: c["name"] for c in self.categories}
    return tuple(names[c] for c in self.label_category_ids)

  @property
  def label_isthing(self) -> tuple[bool, ...]:
    things = set(self.thing_category_ids)
    return tuple(c in things for c in self.label_category_ids)


def dataset_metadata(config) -> DatasetMetadata:
  """The metadata of `config.name` for `config.task`, checked against `config.num_classes`.

  Raises:
    ValueError: for a dataset without category metadata or that cannot serve the task
      (`check_task`), or a `num_classes` that differs from the dataset's.
  """
  categories = categories_of(config.name)
  check_task(config.name, config.task)
  if config.task == "instance":
    label_ids = tuple(c["id"] for c in categories if c["isthing"])
  else:
    label_ids = tuple(c["id"] for c in categories)
  meta = DatasetMetadata(config.name, config.task, categories, label_ids)
  if config.num_classes is not None and config.num_classes != meta.num_classes:
    raise ValueError(
      f"dataset.num_classes = {config.num_classes}, but {config.name!r} has "
      f"{meta.num_classes} classes for the {config.task!r} task"
    )
  return meta
