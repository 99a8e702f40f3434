"""Cityscapes fine: the official raw layout -> TFDS ArrayRecord -> the eval loader."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from mpformer_jax.data import (
  cityscapes_categories,
  dataset_metadata,
  default_dataset_config,
  pipeline,
)
from mpformer_jax.data import panoptic_png as png
from tests.raw_datasets import check_bad_train_example, cityscapes_annotation, write_cityscapes

# The written example's segments (`raw_datasets.cityscapes_annotation`).
SEGMENT_IDS = [7, 11, 23, 24, 24000, 26000, 26001]
CATEGORY_IDS = [7, 11, 23, 24, 24, 26, 26]
ISCROWD = [False, False, False, True, False, False, False]


def test_instance_ids_png_is_16_bit_and_lossless():
  _, instances = cityscapes_annotation(0)
  buffer = io.BytesIO()
  Image.fromarray(instances).save(buffer, format="PNG")
  data = buffer.getvalue()
  assert data[24] == 16 and data[25] == 0  # IHDR: bit depth 16, grayscale, as the real files
  with Image.open(io.BytesIO(data)) as decoded:
    np.testing.assert_array_equal(np.asarray(decoded), instances)


def test_category_table_is_trainid_ordered():
  cats = cityscapes_categories.CATEGORIES
  stuff_ids = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23)  # labelIds of trainIds 0..10
  thing_ids = (24, 25, 26, 27, 28, 31, 32, 33)  # trainIds 11..18
  assert tuple(c["id"] for c in cats) == stuff_ids + thing_ids
  assert all(c["isthing"] == (c["id"] in thing_ids) for c in cats)
  things = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
  assert [c["name"] for c in cats if c["isthing"]] == things
  assert cats[6]["name"] == "traffic light" and not cats[6]["isthing"]
  config = default_dataset_config()
  config.name, config.task, config.num_classes = "cityscapes", "instance", 8
  assert dataset_metadata(config).label_category_ids == thing_ids
  config.task, config.num_classes = "panoptic", 19
  assert dataset_metadata(config).category_to_label[26] == 13  # car: trainId 13


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  tf_before = "tensorflow" in sys.modules
  from mpformer_jax.data.prepare import prepare

  raw = tmp_path_factory.mktemp("cityscapes_raw")
  written = {
    "train": [
      write_cityscapes(raw, "train", "aachen", 19),
      write_cityscapes(raw, "train", "bochum", 7, variant=2),
    ],
    "validation": [
      write_cityscapes(raw, "validation", "frankfurt", 294),
      write_cityscapes(raw, "validation", "lindau", 5, variant=3),
    ],
  }
  data_dir = str(tmp_path_factory.mktemp("cityscapes_tfds"))
  builder, report = prepare("cityscapes", str(raw), data_dir)
  return builder, report, raw, data_dir, written, tf_before


def test_reads_back_what_was_written_without_tensorflow(built):
  builder, report, raw, _, written, tf_before = built
  assert report.dataset == "cityscapes" and report.skipped == []
  assert report.examples == {"train": 2, "validation": 2}
  assert report.skipped_per_split == {"train": 0, "validation": 0}
  assert report.reencoded_images == [] and report.counts == {}
  for split, examples in written.items():
    source = builder.as_data_source(split)
    assert len(source) == len(examples)
    for index, (paths, image, instances) in enumerate(examples):
      example = source[index]
      assert example["image_id"] == index
      assert example["file_name"].decode() == str(paths[0].relative_to(raw))
      np.testing.assert_array_equal(example["image"], image)
      segments = example["segments"]
      assert [int(v) for v in segments["id"]] == SEGMENT_IDS
      assert [int(v) for v in segments["category_id"]] == CATEGORY_IDS
      assert [bool(v) for v in segments["iscrowd"]] == ISCROWD
      areas = [int(np.sum(instances == i)) for i in SEGMENT_IDS]
      assert [int(v) for v in segments["area"]] == areas
      expected = np.where(np.isin(instances, SEGMENT_IDS), instances, 0)
      np.testing.assert_array_equal(png.rgb_to_id(example["panoptic"]), expected)
  if not tf_before:
    assert "tensorflow" not in sys.modules


def test_prepare_reuses_the_data_and_tfds_finds_it(built):
  import tensorflow_datasets as tfds

  from mpformer_jax.data import cityscapes_builder
  from mpformer_jax.data.prepare import prepare

  builder, report, raw, data_dir, _, _ = built
  again, stored = prepare("cityscapes", str(raw), data_dir, skip_bad=True)
  assert again.data_dir == builder.data_dir and stored == report
  found = tfds.builder("cityscapes", data_dir=data_dir)
  assert isinstance(found, cityscapes_builder.Cityscapes) and found.report == report


@pytest.mark.parametrize(
  ("task", "num_classes", "target_ids", "target_labels"),
  [
    # Crowd segments are never targets; the instance task keeps things only.
    ("panoptic", 19, [7, 11, 23, 24000, 26000, 26001], [0, 2, 10, 11, 13, 13]),
    ("instance", 8, [24000, 26000, 26001], [0, 2, 2]),
  ],
)
def test_eval_loader_targets(built, task, num_classes, target_ids, target_labels):
  _, _, _, data_dir, written, _ = built
  config = default_dataset_config()
  config.name, config.task, config.num_classes = "cityscapes", task, num_classes
  config.data_dir, config.eval_size = data_dir, (32, 64)
  batch = next(iter(pipeline.create_eval_loader(config, 2, process_index=0, process_count=1)))
  for b, (_, _, instances) in enumerate(written["validation"]):
    n = len(target_ids)
    np.testing.assert_array_equal(batch["ids"][b, :n], target_ids)
    np.testing.assert_array_equal(batch["labels"][b, :n], target_labels)
    assert batch["valid"][b].sum() == n
    expected = np.where(np.isin(instances, target_ids), instances, 0)
    np.testing.assert_array_equal(batch["segment_ids"][b, :, :48], expected)
    # The raw ground truth keeps the crowd segment, flagged.
    s = len(SEGMENT_IDS)
    np.testing.assert_array_equal(batch["gt_ids"][b, :s], SEGMENT_IDS)
    np.testing.assert_array_equal(batch["gt_iscrowd"][b, :s], ISCROWD)
    # Training label of every segment; -1 for stuff, which the instance task does not label.
    labels = [-1, -1, -1, 0, 0, 2, 2] if task == "instance" else [0, 2, 10, 11, 11, 13, 13]
    np.testing.assert_array_equal(batch["gt_labels"][b, :s], labels)


# ---------------------------------------------------------------------------------------------
# Bad data: each case raises naming the file, or with skip_bad is left out and reported.


def _corrupt_image(raw):
  (image, _, _), _, _ = write_cityscapes(raw, "train", "ulm", 9)
  image.write_bytes(image.read_bytes()[:120])  # truncated PNG
  return image, "unreadable image"


def _unreadable_label_ids(raw):
  (_, label_ids, _), _, _ = write_cityscapes(raw, "train", "ulm", 9)
  label_ids.write_bytes(b"\x89PNG garbage")
  return label_ids, "unreadable annotation"


def _missing_label_ids(raw):
  (image, label_ids, _), _, _ = write_cityscapes(raw, "train", "ulm", 9)
  label_ids.unlink()
  return image, "labelIds file is missing"


def _missing_instance_ids(raw):
  (image, _, instance_ids), _, _ = write_cityscapes(raw, "train", "ulm", 9)
  instance_ids.unlink()
  return image, "instanceIds file is missing"


def _missing_image(raw):
  (image, label_ids, _), _, _ = write_cityscapes(raw, "train", "ulm", 9)
  image.unlink()
  return label_ids, "image file is missing"


def _size_mismatch(raw):
  labels, instances = cityscapes_annotation(0)
  (_, _, instance_ids), _, _ = write_cityscapes(raw, "train", "ulm", 9, instances=instances[:, :40])
  return instance_ids, "differs from the image size"


def _inconsistent(raw):
  labels, instances = cityscapes_annotation(0)
  instances[0, 0] = 26005  # a car where labelIds says sky
  (_, _, instance_ids), _, _ = write_cityscapes(raw, "train", "ulm", 9, instances=instances)
  return instance_ids, "disagrees with ulm_000000_000009_gtFine_labelIds.png on 1 pixel(s)"


def _unknown_label(raw):
  labels, instances = cityscapes_annotation(0)
  labels[0, 0], instances[0, 0] = 40, 40
  (_, label_ids, _), _, _ = write_cityscapes(
    raw, "train", "ulm", 9, labels=labels, instances=instances
  )
  return label_ids, "unknown label ids [40]"


def _unknown_instance_label(raw):
  labels, instances = cityscapes_annotation(0)
  labels[0, 0], instances[0, 0] = 0, 34001
  (_, _, instance_ids), _, _ = write_cityscapes(
    raw, "train", "ulm", 9, labels=labels, instances=instances
  )
  return instance_ids, "unknown label ids [34]"


BAD_CASES = {
  "corrupt_image": _corrupt_image,
  "unreadable_label_ids": _unreadable_label_ids,
  "missing_label_ids": _missing_label_ids,
  "missing_instance_ids": _missing_instance_ids,
  "missing_image": _missing_image,
  "size_mismatch": _size_mismatch,
  "inconsistent": _inconsistent,
  "unknown_label": _unknown_label,
  "unknown_instance_label": _unknown_instance_label,
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_example_raises_or_is_skipped_and_reported(case, tmp_path):
  raw = tmp_path / "raw"
  write_cityscapes(raw, "train", "aachen", 1)
  write_cityscapes(raw, "validation", "lindau", 2)
  bad_file, reason = BAD_CASES[case](raw)
  check_bad_train_example("cityscapes", raw, tmp_path, bad_file, reason)
