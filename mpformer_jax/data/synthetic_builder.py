"""TFDS builder of the procedural `synthetic_shapes` panoptic dataset (ArrayRecord, no TF).

Importing this module registers the builder, so `tfds.builder("synthetic_shapes/<config>")` and
`tfds.data_source(...)` find it. `ensure_built` builds a configuration into a data directory on
first use (seconds) and reuses it afterwards.

Features of every example (the layout of TFDS' COCO panoptic data, so the pipeline can read both):

- `image`: uint8 `[H, W, 3]`, stored as PNG;
- `panoptic`: uint8 `[H, W, 3]` PNG in COCO's RGB id encoding (id = R + 256 G + 256**2 B);
- `image_id`: int64;
- `segments`: sequence of `{id, category_id, area, iscrowd}`.

The generator is frozen by `VERSION`: any change to `synthetic_shapes.generate_scene` that alters
its output must bump it, or stale data directories would silently be reused.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from mpformer_jax.data import panoptic_png, synthetic_shapes

NAME = "synthetic_shapes"


def categories() -> list[dict]:
  """The dataset's categories: `{"id", "name", "isthing"}` dicts, things first."""
  return copy.deepcopy(list(synthetic_shapes.CATEGORIES))


@dataclasses.dataclass
class SyntheticShapesConfig(tfds.core.BuilderConfig):
  """Size of a `synthetic_shapes` variant; `make_config` names it after its fields.

  Attributes:
    image_size: `(H, W)` of every image.
    num_train: examples in the `train` split.
    num_validation: examples in the `validation` split.
    max_instances: things per image are uniform in `[1, max_instances]`.
    seed: dataset seed; `train` uses scenes `(seed, i)`, `validation` `(seed + 1, i)`.
  """

  image_size: tuple[int, int] = (128, 128)
  num_train: int = 512
  num_validation: int = 64
  max_instances: int = 6
  seed: int = 0


def make_config(
  image_size: tuple[int, int] = (128, 128),
  num_train: int = 512,
  num_validation: int = 64,
  max_instances: int = 6,
  seed: int = 0,
) -> SyntheticShapesConfig:
  """A config whose name encodes every field, so variants never share a directory."""
  h, w = (int(s) for s in image_size)
  name = f"{h}x{w}_train{num_train}_val{num_validation}_inst{max_instances}_seed{seed}"
  return SyntheticShapesConfig(
    name=name,
    description="Procedural coloured shapes on background regions.",
    image_size=(h, w),
    num_train=int(num_train),
    num_validation=int(num_validation),
    max_instances=int(max_instances),
    seed=int(seed),
  )


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural panoptic scenes from `synthetic_shapes.generate_scene`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [make_config()]
  # TFDS derives the location of a builder's checksum file through `importlib_resources`, a
  # package it only declares for Python < 3.9, and fails without it. Naming the source file
  # directly skips that lookup (this builder downloads nothing, so it has no checksums).
  code_path = tfds.core.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict(
      {
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "panoptic": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "image_id": np.int64,
        "segments": tfds.features.Sequence(
          {"id": np.int64, "category_id": np.int64, "area": np.int64, "iscrowd": np.bool_}
        ),
      }
    )
    # Records stay in generation order, so record i is scene i (the loaders shuffle anyway).
    return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    return {
      "train": self._generate_examples(config.seed, config.num_train),
      "validation": self._generate_examples(config.seed + 1, config.num_validation),
    }

  def _generate_examples(self, seed: int, num_examples: int):
    config = self.builder_config
    for index in range(num_examples):
      scene = synthetic_shapes.generate_scene(seed, index, config.image_size, config.max_instances)
      # TFDS' Image feature encodes numpy arrays only through TensorFlow; PNG bytes avoid it.
      yield (
        index,
        {
          "image": panoptic_png.encode_png(scene["image"]),
          "panoptic": panoptic_png.encode_png(panoptic_png.id_to_rgb(scene["panoptic"])),
          "image_id": index,
          "segments": scene["segments"],
        },
      )


def ensure_built(
  data_dir: str,
  image_size: tuple[int, int] = (128, 128),
  num_train: int = 512,
  num_validation: int = 64,
  max_instances: int = 6,
  seed: int = 0,
) -> SyntheticShapes:
  """The builder of this variant, generated into `data_dir` unless it is already there.

  Args:
    data_dir: TFDS data directory; the data goes to `data_dir/synthetic_shapes/<config>/<ver>`.
    image_size: `(H, W)`.
    num_train: examples in `train`.
    num_validation: examples in `validation`.
    max_instances: maximum things per image.
    seed: dataset seed.

  Returns:
    The prepared builder; read it with `builder.as_data_source(split=...)`.
  """
  config = make_config(image_size, num_train, num_validation, max_instances, seed)
  # TFDS refuses a custom config object that shares the name of a class config: pass those by
  # name.
  known = {c.name for c in SyntheticShapes.BUILDER_CONFIGS}
  config_arg = config.name if config.name in known else config
  builder = SyntheticShapes(data_dir=data_dir, config=config_arg, file_format="array_record")
  if not builder.is_prepared():
    try:
      builder.download_and_prepare()
    except OSError:
      # Another process (e.g. a second host on a shared disk) may have finished the same build
      # first and won the final rename; its data is identical.
      builder = SyntheticShapes(data_dir=data_dir, config=config_arg, file_format="array_record")
      if not builder.is_prepared():
        raise
  return builder
