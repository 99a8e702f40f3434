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
}


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
    ValueError: for a dataset without category metadata, or a `num_classes` that differs from
      the dataset's.
  """
  categories = categories_of(config.name)
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
