"""ADE20K panoptic: SceneParsing + instance annotations -> Mask2Former's panoptic ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mpformer_jax.data import ade20k_categories, dataset_metadata, default_dataset_config, pipeline
from mpformer_jax.data import panoptic_png as png
from tests.raw_datasets import (
  SIZE,
  ade_image,
  ade_label_map,
  ade_panoptic_annotation,
  check_bad_train_example,
  write_ade20k,
  write_ade20k_panoptic,
)

NAME = "ade20k_panoptic"
# Mask2Former's thing classes of ADE20K (the semantic ids, 1-based, of `ADE20K_150_CATEGORIES`
# entries with `isthing: 1`), in the order of `ade20k_instance_catid_mapping.txt`: instance
# class k is THINGS[k - 1]. Typed from the reference, independently of our category table.
THINGS = [
  8, 9, 11, 13, 15, 16, 19, 20, 21, 23, 24, 25, 28, 31, 32, 33, 34, 36, 37, 38, 39, 40, 42, 43,
  44, 45, 46, 48, 50, 51, 54, 56, 57, 58, 59, 63, 65, 66, 67, 68, 70, 71, 72, 73, 74, 75, 76, 77,
  79, 81, 82, 83, 84, 86, 87, 88, 89, 90, 91, 93, 94, 96, 98, 99, 103, 104, 105, 108, 109, 111,
  112, 113, 116, 117, 119, 120, 121, 122, 124, 125, 126, 127, 128, 130, 131, 133, 134, 135, 136,
  137, 138, 139, 140, 143, 144, 145, 147, 148, 149, 150,
]  # fmt: skip


def expected_panoptic(label: np.ndarray, instances: np.ndarray):
  """The reference's conversion, written plainly: `(id map [H, W], [(category, area)])`.

  Stuff classes first (increasing), then instances (increasing G) painted over them; segments
  left without pixels are dropped and the rest numbered 1..n.
  """
  things = set(THINGS)
  layers = [(v, label == v) for v in range(1, 151) if v not in things and (label == v).any()]
  classes, ids = instances[..., 0], instances[..., 1]
  for g in sorted(set(ids.ravel().tolist()) - {0}):
    (r,) = set(classes[ids == g].tolist())
    layers.append((THINGS[r - 1], ids == g))
  painted = np.zeros(label.shape, np.int64)
  for k, (_, mask) in enumerate(layers, 1):
    painted[mask] = k
  pan, segments = np.zeros(label.shape, np.int64), []
  for k, (category, _) in enumerate(layers, 1):
    area = int(np.sum(painted == k))
    if area:
      segments.append((category, area))
      pan[painted == k] = len(segments)
  return pan, segments


def test_thing_classes_and_instance_mapping_match_the_reference():
  from mpformer_jax.data import ade20k_builder, metadata

  assert [c["id"] for c in ade20k_categories.CATEGORIES if c["isthing"]] == THINGS
  assert ade20k_builder.INSTANCE_TO_CLASS[1:].tolist() == THINGS
  assert metadata.categories_of(NAME) == metadata.categories_of("ade20k_semantic")
  config = default_dataset_config()
  config.name, config.task, config.num_classes = NAME, "instance", 100
  meta = dataset_metadata(config)
  # Instance label k - 1 is instance class k: the instance models' labels are the PNG's R - 1.
  assert meta.label_category_ids == tuple(THINGS)
  config.task, config.num_classes = "panoptic", 150
  assert dataset_metadata(config).category_to_label == {i: i - 1 for i in range(1, 151)}


def test_expected_panoptic_of_the_test_scene():
  # The scene has what the conversion must handle, as `expected_panoptic` sees it.
  label, instances = ade_panoptic_annotation(0)
  pan, segments = expected_panoptic(label, instances)
  # Stuff: wall, sky (grass, 10, is covered by the bed); things: person x2, chair, bed, flag.
  assert [c for c, _ in segments] == [1, 3, 13, 13, 20, 8, 150]
  assert not pan[14:30, 30:32].any()  # person pixels without an instance are void
  assert (pan[8:16, 4:12] == 5).all()  # the chair overwrites sky and wall
  assert pan[31, 0] == 1  # R without G: still wall


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  from mpformer_jax.data.prepare import prepare

  raw = tmp_path_factory.mktemp("ade_pan_raw")
  written = {"train": [], "validation": []}
  for split, seeds in (("train", (1, None)), ("validation", (0, 3))):
    for index, seed in enumerate(seeds, 1):
      if seed is None:  # an image without instances: stuff only
        label = ade_label_map(0)
        instances = np.zeros((*SIZE, 3), np.uint8)
      else:
        label, instances = ade_panoptic_annotation(seed)
      image = ade_image(10 * index + len(split))
      paths = write_ade20k_panoptic(raw, split, index, image, label, instances)
      written[split].append((paths, label, instances))
  data_dir = str(tmp_path_factory.mktemp("ade_pan_tfds"))
  builder, report = prepare(NAME, str(raw), data_dir)
  return builder, report, raw, data_dir, written


def _report_counts(written) -> dict[str, int]:
  """The report's counts, derived from the written files."""
  things = np.isin(np.arange(151), THINGS)
  counts = dict.fromkeys(
    ("stuff_pixels_overwritten", "stuff_segments_emptied", "thing_pixels_without_instance"), 0
  )
  for examples in written.values():
    for _, label, instances in examples:
      on = instances[..., 1] > 0
      stuff = (label > 0) & ~things[label]
      counts["stuff_pixels_overwritten"] += int(np.sum(stuff & on))
      counts["thing_pixels_without_instance"] += int(np.sum(things[label] & ~on))
      emptied = [v for v in np.unique(label[stuff]) if not np.any((label == v) & ~on)]
      counts["stuff_segments_emptied"] += len(emptied)
  return counts


def test_reads_back_the_reference_conversion(built):
  builder, report, raw, _, written = built
  assert report.dataset == NAME and report.skipped == [] and report.reencoded_images == []
  assert report.examples == {"train": 2, "validation": 2}
  counts = _report_counts(written)
  assert report.counts == counts
  # Both scenes with instances have overwritten and emptied stuff and uncovered thing pixels.
  assert counts["stuff_segments_emptied"] == 3 and counts["stuff_pixels_overwritten"] > 0
  for split, examples in written.items():
    source = builder.as_data_source(split)
    assert len(source) == len(examples)
    for index, ((image_path, _, _), label, instances) in enumerate(examples):
      example = source[index]
      assert example["image_id"] == index
      assert example["file_name"].decode() == str(image_path.relative_to(raw))
      with Image.open(image_path) as decoded:
        np.testing.assert_array_equal(example["image"], np.asarray(decoded.convert("RGB")))
      pan, expected = expected_panoptic(label, instances)
      np.testing.assert_array_equal(png.rgb_to_id(example["panoptic"]), pan)
      segments = example["segments"]
      n = len(expected)
      assert [int(v) for v in segments["id"]] == list(range(1, n + 1))
      assert [int(v) for v in segments["category_id"]] == [c for c, _ in expected]
      assert [int(v) for v in segments["area"]] == [a for _, a in expected]
      assert not any(segments["iscrowd"])


def test_prepare_reuses_the_data_and_tfds_finds_it(built):
  import tensorflow_datasets as tfds

  from mpformer_jax.data import ade20k_builder, sources
  from mpformer_jax.data.prepare import prepare

  builder, report, raw, data_dir, _ = built
  again, stored = prepare(NAME, str(raw), data_dir, skip_bad=True)
  assert again.data_dir == builder.data_dir and stored == report
  found = tfds.builder(NAME, data_dir=data_dir)
  assert isinstance(found, ade20k_builder.Ade20kPanoptic) and found.report == report
  config = default_dataset_config()
  config.name, config.task, config.num_classes, config.data_dir = NAME, "panoptic", 150, data_dir
  assert len(sources.open_source(config, "eval_split")) == 2


@pytest.mark.parametrize(("task", "num_classes"), [("panoptic", 150), ("instance", 100)])
def test_eval_loader_targets(built, task, num_classes):
  _, _, _, data_dir, written = built
  config = default_dataset_config()
  config.name, config.task, config.num_classes = NAME, task, num_classes
  config.data_dir, config.eval_size = data_dir, (32, 64)
  batch = next(iter(pipeline.create_eval_loader(config, 2, process_index=0, process_count=1)))
  for b, (_, label, instances) in enumerate(written["validation"]):
    pan, expected = expected_panoptic(label, instances)
    ids = np.arange(1, len(expected) + 1)
    categories = np.array([c for c, _ in expected])
    isthing = np.isin(categories, THINGS)
    # Panoptic: every segment, label = class - 1. Instance: things, label = instance class - 1.
    if task == "panoptic":
      labels = categories - 1
    else:
      labels = np.array([THINGS.index(c) if c in THINGS else -1 for c in categories])
    kept = np.ones_like(isthing) if task == "panoptic" else isthing
    n = int(kept.sum())
    np.testing.assert_array_equal(batch["ids"][b, :n], ids[kept])
    np.testing.assert_array_equal(batch["labels"][b, :n], labels[kept])
    assert batch["valid"][b].sum() == n
    target_map = np.where(np.isin(pan, ids[kept]), pan, 0)
    np.testing.assert_array_equal(batch["segment_ids"][b, :, :48], target_map)
    assert not batch["segment_ids"][b, :, 48:].any()  # padding is void
    # The raw ground truth: every segment, with its task label (-1: stuff in the instance task).
    s = len(expected)
    np.testing.assert_array_equal(batch["panoptic"][b, :, :48], pan)
    np.testing.assert_array_equal(batch["gt_ids"][b, :s], ids)
    np.testing.assert_array_equal(batch["gt_labels"][b, :s], labels)
    np.testing.assert_array_equal(batch["gt_isthing"][b, :s], isthing)
    assert batch["gt_valid"][b].sum() == s and not batch["gt_iscrowd"][b].any()
    # The semantic metrics score against the SceneParsing annotation itself, which also labels
    # the thing pixels no instance covers (void in the panoptic map).
    lut = np.full(256, 255)
    if task == "panoptic":
      lut[1:151] = np.arange(150)
    else:
      lut[THINGS] = np.arange(100)
    np.testing.assert_array_equal(batch["semantic_gt"][b, :, :48], lut[label])
    assert (batch["semantic_gt"][b, :, 48:] == 255).all()
    uncovered = (pan == 0) & (label > 0)
    assert uncovered.any() and (batch["semantic_gt"][b][:, :48][uncovered] != 255).any()


# ---------------------------------------------------------------------------------------------
# Bad data: each case raises naming the file, or with skip_bad is left out and reported.


def _write_bad(raw, label=None, instances=None):
  """Train example 9 with the given (default: the test scene's) annotations; its three paths."""
  default_label, default_instances = ade_panoptic_annotation(0)
  label = default_label if label is None else label
  instances = default_instances if instances is None else instances
  return write_ade20k_panoptic(raw, "train", 9, ade_image(9), label, instances)


def _two_classes(raw):
  _, instances = ade_panoptic_annotation(0)
  instances[14, 22, 0] = 8  # one pixel of person 1 says chair
  *_, instance_path = _write_bad(raw, instances=instances)
  return instance_path, "instance 1 has classes [4, 8]"


def _no_class(raw):
  _, instances = ade_panoptic_annotation(0)
  instances[0, 0] = (0, 3, 0)  # an instance id without a class
  *_, instance_path = _write_bad(raw, instances=instances)
  return instance_path, "instance 3 has class 0 (instance classes are 1..100)"


def _class_above_100(raw):
  _, instances = ade_panoptic_annotation(0)
  instances[0, 0] = (101, 3, 0)
  *_, instance_path = _write_bad(raw, instances=instances)
  return instance_path, "instance 3 has class 101"


def _missing_instances(raw):
  image_path, _, instance_path = _write_bad(raw)
  instance_path.unlink()
  return image_path, "instance annotation missing (no annotations_instance/training/"


def _missing_annotation(raw):
  image_path, label_path, _ = _write_bad(raw)
  label_path.unlink()
  return image_path, "annotation missing"


def _instance_size_mismatch(raw):
  _, instances = ade_panoptic_annotation(0)
  *_, instance_path = _write_bad(raw, instances=instances[:, :40])
  return instance_path, "instance annotation size (32, 40) differs from the image size (32, 48)"


def _label_size_mismatch(raw):
  label, _ = ade_panoptic_annotation(0)
  _, label_path, _ = _write_bad(raw, label=label[:30])
  return label_path, "differs from the image size"


def _gray_instances(raw):
  *_, instance_path = _write_bad(raw)
  Image.fromarray(ade_panoptic_annotation(0)[1][..., 1]).save(instance_path)
  return instance_path, "expected an RGB instance annotation PNG"


def _unknown_category(raw):
  label, _ = ade_panoptic_annotation(0)
  label[0, 0] = 151
  _, label_path, _ = _write_bad(raw, label=label)
  return label_path, "unknown category ids [151]"


BAD_CASES = {
  "two_classes": _two_classes,
  "no_class": _no_class,
  "class_above_100": _class_above_100,
  "missing_instances": _missing_instances,
  "missing_annotation": _missing_annotation,
  "instance_size_mismatch": _instance_size_mismatch,
  "label_size_mismatch": _label_size_mismatch,
  "gray_instances": _gray_instances,
  "unknown_category": _unknown_category,
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_example_raises_or_is_skipped_and_reported(case, tmp_path):
  raw = tmp_path / "raw"
  label, instances = ade_panoptic_annotation(1)
  write_ade20k_panoptic(raw, "train", 1, ade_image(1), label, instances)
  write_ade20k_panoptic(raw, "validation", 1, ade_image(2), label, instances)
  bad_file, reason = BAD_CASES[case](raw)
  check_bad_train_example(NAME, raw, tmp_path, bad_file, reason)


def test_missing_instance_directory_fails_the_build(tmp_path):
  from mpformer_jax.data import raw_io
  from mpformer_jax.data.prepare import prepare

  raw = tmp_path / "raw"
  label, instances = ade_panoptic_annotation(0)
  write_ade20k_panoptic(raw, "train", 1, ade_image(1), label, instances)
  write_ade20k(raw, "validation", 1, ade_image(2), label)  # no instance directory
  with pytest.raises(raw_io.RawDataError, match="annotations_instance") as error:
    prepare(NAME, str(raw), str(tmp_path / "out"), skip_bad=True)
  assert error.value.file == str(raw / "ADEChallengeData2016/annotations_instance/validation")
  assert not isinstance(error.value, raw_io.BadExampleError)
