"""Random-access TFDS data sources of the configured dataset (synthetic data is built if needed)."""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

# Importing `prepare` registers the real-data builders with TFDS (it imports their modules, not
# TensorFlow). This must happen before any `tfds.builder` call: looking up a name TFDS does not
# know makes it load its own builders, among them a TF-based "cityscapes" that would take the
# name of ours.
from mpformer_jax.data import prepare, synthetic_builder, tfds_sources


def open_source(config, split_field: str, segments_only: bool = False):
  """The ArrayRecord data source of the split named by `config.<split_field>`.

  Args:
    config: the dataset config (`default_dataset_config()` fields).
    split_field: "train_split" or "eval_split".
    segments_only: skip decoding the images and panoptic maps (they come back as encoded
      bytes), for scanning the segment lists. TFDS' own datasets decode everything anyway.

  Returns:
    A random-access source: `len()` and `source[i]` -> dict of decoded numpy features. For
    TFDS' own datasets (`tfds_sources.ADAPTERS`), an adapter that maps TFDS' elements to the
    layout of ours.

  Raises:
    ValueError: if the split does not exist, or a real dataset is not prepared in
      `config.data_dir`; for TFDS' own datasets also a task the dataset cannot serve or data
      stored without random access (`tfds_sources.prepared_builder`).
  """
  data_dir = os.path.expanduser(config.data_dir)
  if config.name == synthetic_builder.NAME:
    s = config.synthetic
    builder = synthetic_builder.ensure_built(
      data_dir, tuple(s.image_size), s.num_train, s.num_validation, s.max_instances, s.seed
    )
  elif config.name in prepare.BUILDERS:
    # Our class itself, not a lookup by name, so no other builder of that name can answer.
    builder = prepare.BUILDERS[config.name](data_dir=data_dir)
    if not builder.is_prepared():
      raise ValueError(
        f"dataset.name: {config.name!r} is not prepared in {data_dir}; build it from the raw "
        f"files with `python -m mpformer_jax.data.prepare --dataset {config.name} "
        f"--manual_dir RAW --data_dir {data_dir}`"
      )
  elif config.name in tfds_sources.ADAPTERS:
    builder = tfds_sources.prepared_builder(config.name, data_dir, config.task)
  else:
    builder = tfds.builder(config.name, data_dir=data_dir)
  split = getattr(config, split_field)
  if split.split("[")[0] not in builder.info.splits:  # allow TFDS slices such as "train[:10%]"
    raise ValueError(
      f"dataset.{split_field}: {config.name!r} has no split {split!r}; "
      f"available: {sorted(builder.info.splits)}"
    )
  if config.name in tfds_sources.ADAPTERS:
    return tfds_sources.ADAPTERS[config.name](builder, split)
  if segments_only:
    skip = tfds.decode.SkipDecoding()
    return builder.as_data_source(split=split, decoders={"image": skip, "panoptic": skip})
  return builder.as_data_source(split=split)
