"""Category metadata of the supported datasets and the training label space of each task."""

from __future__ import annotations

import dataclasses

from mpformer_jax.data import synthetic_shapes

# Dataset name -> its categories (`{"id", "name", "isthing"}`, things first). A new dataset needs
# an entry here; TFDS' own metadata does not say which classes are things.
CATEGORIES = {"synthetic_shapes": synthetic_shapes.CATEGORIES}


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
  if config.name not in CATEGORIES:
    raise ValueError(
      f"dataset.name: no category metadata for {config.name!r}; known: {sorted(CATEGORIES)}"
    )
  categories = tuple(dict(c) for c in CATEGORIES[config.name])
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
