"""ADE20K SceneParsing: the official raw layout -> TFDS ArrayRecord -> the eval loader."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from mpformer_jax.data import ade20k_categories, dataset_metadata, default_dataset_config, pipeline
from mpformer_jax.data import panoptic_png as png
from tests.raw_datasets import SIZE, ade_image, ade_label_map, check_bad_train_example, write_ade20k


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  tf_before = "tensorflow" in sys.modules
  from mpformer_jax.data.prepare import prepare

  raw = tmp_path_factory.mktemp("ade_raw")
  written = {"train": [], "validation": []}
  for split, count in (("train", 3), ("validation", 2)):
    for i in range(count):
      # Example 1 of train is a grayscale JPEG (a few real ones are): stored as RGB.
      image = ade_image(10 * i + len(split), gray=split == "train" and i == 1)
      label = ade_label_map(i)
      written[split].append((*write_ade20k(raw, split, i + 1, image, label), label))
  data_dir = str(tmp_path_factory.mktemp("ade_tfds"))
  builder, report = prepare("ade20k_semantic", str(raw), data_dir)
  return builder, report, raw, data_dir, written, tf_before


def test_category_table_matches_the_reference():
  cats = ade20k_categories.CATEGORIES
  assert [c["id"] for c in cats] == list(range(1, 151))
  assert sum(c["isthing"] for c in cats) == 100
  assert len({c["name"] for c in cats}) == 150
  assert cats[0] == {"id": 1, "name": "wall", "isthing": False}
  assert cats[8] == {"id": 9, "name": "window ", "isthing": True}  # detectron2's spelling
  assert cats[12] == {"id": 13, "name": "person", "isthing": True}
  assert cats[138]["name"] == "trash can" and cats[138]["isthing"]
  assert cats[141]["name"] == "crt screen" and not cats[141]["isthing"]
  assert cats[149] == {"id": 150, "name": "flag", "isthing": True}
  config = default_dataset_config()
  config.name, config.task, config.num_classes = "ade20k_semantic", "semantic", 150
  meta = dataset_metadata(config)
  assert meta.category_to_label == {i: i - 1 for i in range(1, 151)}


def test_reads_back_what_was_written_without_tensorflow(built):
  builder, report, raw, _, written, tf_before = built
  assert report.dataset == "ade20k_semantic" and report.skipped == []
  assert report.examples == {"train": 3, "validation": 2}
  assert report.skipped_per_split == {"train": 0, "validation": 0}
  # The grayscale JPEG keeps its bytes too: every decoder repeats its channel.
  assert report.reencoded_images == [] and report.counts == {}
  for split, examples in written.items():
    source = builder.as_data_source(split)
    assert len(source) == len(examples)
    for index, (image_path, _, label) in enumerate(examples):
      example = source[index]
      assert example["image_id"] == index
      assert example["file_name"].decode() == str(image_path.relative_to(raw))
      with Image.open(image_path) as decoded:
        np.testing.assert_array_equal(example["image"], np.asarray(decoded.convert("RGB")))
      assert example["image"].shape == (*SIZE, 3)
      np.testing.assert_array_equal(png.rgb_to_id(example["panoptic"]), label)
      classes, areas = np.unique(label[label > 0], return_counts=True)
      segments = example["segments"]
      assert [int(v) for v in segments["id"]] == classes.tolist()
      assert [int(v) for v in segments["category_id"]] == classes.tolist()
      assert [int(v) for v in segments["area"]] == areas.tolist()
      assert not any(segments["iscrowd"])
  if not tf_before:
    assert "tensorflow" not in sys.modules


def test_prepare_reuses_the_data_and_tfds_finds_it(built):
  import tensorflow_datasets as tfds

  from mpformer_jax.data import ade20k_builder
  from mpformer_jax.data.prepare import prepare

  builder, report, raw, data_dir, _, _ = built
  again, stored = prepare("ade20k_semantic", str(raw), data_dir, skip_bad=True)
  assert again.data_dir == builder.data_dir and stored == report
  found = tfds.builder("ade20k_semantic", data_dir=data_dir)
  assert isinstance(found, ade20k_builder.Ade20kSemantic) and found.report == report
  assert len(found.as_data_source("validation")) == 2


def test_eval_loader_gives_semantic_targets(built):
  _, _, _, data_dir, written, _ = built
  config = default_dataset_config()
  config.name, config.task, config.num_classes = "ade20k_semantic", "semantic", 150
  config.data_dir, config.eval_size = data_dir, (32, 64)
  loader = pipeline.create_eval_loader(config, 2, process_index=0, process_count=1)
  batches = list(loader)
  assert len(batches) == 1
  batch = batches[0]
  for b, (_, _, label) in enumerate(written["validation"]):
    classes = np.unique(label[label > 0])
    n = len(classes)
    # Semantic targets: one per class, label = class - 1, target id = label + 1 = class.
    np.testing.assert_array_equal(batch["labels"][b, :n], classes - 1)
    np.testing.assert_array_equal(batch["ids"][b, :n], classes)
    assert batch["valid"][b].sum() == n
    np.testing.assert_array_equal(batch["segment_ids"][b, :, :48], label)
    assert not batch["segment_ids"][b, :, 48:].any()  # padding is void
    np.testing.assert_array_equal(batch["gt_labels"][b, :n], classes - 1)
    np.testing.assert_array_equal(batch["image_size"][b], SIZE)


# ---------------------------------------------------------------------------------------------
# Bad data: each case raises naming the file, or with skip_bad is left out and reported.


def _corrupt_image(raw):
  image_path, _ = write_ade20k(raw, "train", 9, ade_image(9), ade_label_map(0))
  image_path.write_bytes(image_path.read_bytes()[:200])  # truncated JPEG
  return image_path, "unreadable image"


def _garbage_image(raw):
  image_path, _ = write_ade20k(raw, "train", 9, ade_image(9), ade_label_map(0))
  image_path.write_bytes(b"not an image at all")
  return image_path, "unreadable image"


def _missing_annotation(raw):
  image_path, label_path = write_ade20k(raw, "train", 9, ade_image(9), ade_label_map(0))
  label_path.unlink()
  return image_path, "annotation missing"


def _missing_image(raw):
  image_path, label_path = write_ade20k(raw, "train", 9, ade_image(9), ade_label_map(0))
  image_path.unlink()
  return label_path, "image missing"


def _size_mismatch(raw):
  _, label_path = write_ade20k(raw, "train", 9, ade_image(9), ade_label_map(0)[:, :40])
  return label_path, "differs from the image size"


def _unknown_category(raw):
  label = ade_label_map(0)
  label[0, 0] = 151
  _, label_path = write_ade20k(raw, "train", 9, ade_image(9), label)
  return label_path, "unknown category ids [151]"


def _rgb_annotation(raw):
  _, label_path = write_ade20k(raw, "train", 9, ade_image(9), ade_label_map(0))
  Image.fromarray(np.stack([ade_label_map(0)] * 3, -1)).save(label_path)
  return label_path, "single-channel"


BAD_CASES = {
  "corrupt_image": _corrupt_image,
  "garbage_image": _garbage_image,
  "missing_annotation": _missing_annotation,
  "missing_image": _missing_image,
  "size_mismatch": _size_mismatch,
  "unknown_category": _unknown_category,
  "rgb_annotation": _rgb_annotation,
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_example_raises_or_is_skipped_and_reported(case, tmp_path):
  raw = tmp_path / "raw"
  write_ade20k(raw, "train", 1, ade_image(1), ade_label_map(0))
  write_ade20k(raw, "validation", 1, ade_image(2), ade_label_map(1))
  bad_file, reason = BAD_CASES[case](raw)
  check_bad_train_example("ade20k_semantic", raw, tmp_path, bad_file, reason)
