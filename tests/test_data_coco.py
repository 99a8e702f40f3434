"""COCO 2017 builders: tiny raw datasets in the official on-disk format, built and read back."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from mpformer_jax.data import (
  coco_builder,
  coco_categories,
  dataset_metadata,
  default_dataset_config,
  panoptic_png,
  pipeline,
)
from mpformer_jax.data.prepare import prepare
from tests.raw_datasets import (
  CAT,
  CROWD,
  DOG_POLY,
  PERSON_POLY,
  H,
  W,
  coco_image,
  coco_panoptic_scenes,
  poly_mask,
  write_coco_instances,
  write_coco_panoptic,
  write_json,
)

PAN_LABEL = {c["id"]: i for i, c in enumerate(coco_categories.PANOPTIC_CATEGORIES)}


def test_category_tables():
  pan, inst = coco_categories.PANOPTIC_CATEGORIES, coco_categories.INSTANCE_CATEGORIES
  things = [c for c in pan if c["isthing"]]
  assert (len(pan), len(inst), len(things), len(pan) - len(things)) == (133, 80, 80, 53)
  assert len({c["id"] for c in pan}) == 133 and len({c["name"] for c in pan}) == 133
  assert pan[:80] == inst  # things first, the same ids and names in both
  assert all(c["isthing"] for c in inst) and not any(c["isthing"] for c in pan[80:])
  assert [c["id"] for c in pan] == sorted(c["id"] for c in pan)
  assert (pan[0]["id"], pan[79]["id"], pan[80]["id"], pan[-1]["id"]) == (1, 90, 92, 200)
  assert (pan[0]["name"], pan[62]["name"], pan[-1]["name"]) == ("person", "tv", "rug-merged")
  meta = dataset_metadata(default_dataset_config())
  assert meta.num_classes == 8  # the default dataset is untouched
  for name, task, k in (("coco_panoptic", "panoptic", 133), ("coco_instance", "instance", 80)):
    config = default_dataset_config()
    config.name, config.task, config.num_classes = name, task, k
    assert dataset_metadata(config).num_classes == k


@pytest.fixture(scope="module")
def panoptic(tmp_path_factory):
  raw = str(tmp_path_factory.mktemp("raw"))
  scenes = write_coco_panoptic(raw)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder, report = prepare("coco_panoptic", raw, data_dir)
  return raw, data_dir, scenes, builder, report


def test_panoptic_reads_back(panoptic):
  raw, data_dir, scenes, builder, report = panoptic
  assert builder.name == "coco_panoptic"
  assert report.examples == {"train": 1, "validation": 3} and report.skipped == []
  assert report.dataset == "coco_panoptic" and not report.skip_bad
  assert report.skipped_per_split == {"train": 0, "validation": 0}
  assert report.reencoded_images == [] and report.counts == {}
  for split, split_dir in (("validation", "val2017"), ("train", "train2017")):
    source = builder.as_data_source(split)
    assert len(source) == len(scenes[split_dir])
    for index, (image_id, seed, ids, segments) in enumerate(scenes[split_dir]):
      example = source[index]
      rel = f"{split_dir}/{image_id:012d}.jpg"
      assert example["image_id"] == image_id and example["file_name"] == rel.encode()
      # The original JPEG bytes are stored: pixels equal a direct decode of the file.
      with Image.open(os.path.join(raw, rel)) as image:
        np.testing.assert_array_equal(example["image"], np.asarray(image))
      assert np.abs(example["image"].astype(int) - coco_image(seed)).mean() < 3
      np.testing.assert_array_equal(panoptic_png.rgb_to_id(example["panoptic"]), ids)
      got = example["segments"]
      assert [int(v) for v in got["id"]] == [s[0] for s in segments]
      assert [int(v) for v in got["category_id"]] == [s[1] for s in segments]
      assert [bool(v) for v in got["iscrowd"]] == [bool(s[2]) for s in segments]
      assert [int(v) for v in got["area"]] == [int(np.sum(ids == s[0])) for s in segments]
  # A second prepare reuses the data and its stored report.
  again, stored = prepare("coco_panoptic", raw, data_dir, skip_bad=True)
  assert again.data_dir == builder.data_dir and stored == report


def test_panoptic_eval_loader_targets(panoptic):
  _, data_dir, scenes, _, _ = panoptic
  config = default_dataset_config()
  config.name, config.task, config.num_classes = "coco_panoptic", "panoptic", 133
  config.data_dir, config.eval_size = data_dir, (64, 64)
  config.max_gt, config.eval_max_segments = 8, 8
  batches = list(pipeline.create_eval_loader(config, 4, process_index=0, process_count=1))
  assert len(batches) == 1
  batch = batches[0]
  assert batch["is_real"].tolist() == [True, True, True, False]
  np.testing.assert_array_equal(batch["image_size"][:3], [[H, W]] * 3)
  # Image 139: sky, person, crowd. The crowd is raw ground truth but no training target.
  sky, person = PAN_LABEL[187], PAN_LABEL[1]
  assert (sky, person) == (119, 0)
  np.testing.assert_array_equal(batch["gt_ids"][0, :3], [0x30201, 7, 70000])
  np.testing.assert_array_equal(batch["gt_labels"][0, :4], [sky, person, person, -1])
  np.testing.assert_array_equal(batch["gt_iscrowd"][0, :3], [False, False, True])
  np.testing.assert_array_equal(batch["gt_isthing"][0, :3], [False, True, True])
  np.testing.assert_array_equal(batch["ids"][0, :3], [0x30201, 7, 0])
  np.testing.assert_array_equal(batch["labels"][0, :2], [sky, person])
  assert batch["valid"][0].tolist() == [True, True] + [False] * 6
  ids = scenes["val2017"][0][2]
  np.testing.assert_array_equal(batch["panoptic"][0, :H, :W], ids)
  np.testing.assert_array_equal(batch["segment_ids"][0, :H, :W], np.where(ids == 70000, 0, ids))
  # Image 285: grass and a dog; image 632 has no segments.
  np.testing.assert_array_equal(batch["labels"][1, :2], [PAN_LABEL[193], PAN_LABEL[18]])
  assert batch["valid"][1].sum() == 2 and not batch["valid"][2].any()
  assert not batch["gt_valid"][2].any()


# ---------------------------------------------------------------------------------------------
# Bad panoptic data: one corruption per case. Each must fail naming the file, or with
# skip_bad=True leave out exactly that example and report it.

BAD = "val2017/000000000285.jpg"
BAD_PNG = "annotations/panoptic_val2017/000000000285.png"


def _corrupt(raw, case: str) -> tuple[str, str]:
  """Damages image 285 of the val split; returns (offending file, expected reason pattern)."""
  jpg, png = os.path.join(raw, BAD), os.path.join(raw, BAD_PNG)
  json_path = os.path.join(raw, "annotations", "panoptic_val2017.json")
  with open(json_path) as f:
    data = json.load(f)
  info = data["annotations"][1]["segments_info"]
  if case == "corrupt_jpeg":
    with open(jpg, "wb") as f:
      f.write(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    return jpg, "corrupt or unreadable image"
  if case == "truncated_jpeg":
    with open(jpg, "rb") as f:
      head = f.read()[:300]
    with open(jpg, "wb") as f:
      f.write(head)
    return jpg, "corrupt or unreadable image"
  if case == "missing_image":
    os.remove(jpg)
    return jpg, "cannot read the image"
  if case == "missing_png":
    os.remove(png)
    return png, "cannot read the panoptic PNG"
  if case == "png_id_not_listed":
    del info[1]  # the dog stays in the PNG
    reason = "PNG ids \\[42\\] are not in segments_info"
  elif case == "listed_id_absent":
    info.append({"id": 99, "category_id": 1, "iscrowd": 0, "area": 5, "bbox": [0, 0, 1, 1]})
    reason = "segments_info ids \\[99\\] do not occur"
  elif case == "unknown_category":
    info[1]["category_id"] = 91  # a gap in COCO's id list
    reason = "unknown category ids \\[91\\]"
  elif case == "png_size_mismatch":
    Image.fromarray(np.zeros((H, W - 8, 3), np.uint8)).save(png)
    reason = "panoptic PNG is \\(32, 40\\) but the image is \\(32, 48\\)"
  elif case == "json_size_mismatch":
    data["images"][1]["width"] = W + 2
    write_json(json_path, data)
    return jpg, "image is 32x48 but the annotation JSON says \\(32, 50\\)"
  else:
    raise AssertionError(case)
  write_json(json_path, data)
  return png, reason


@pytest.mark.parametrize(
  "case",
  [
    "corrupt_jpeg",
    "truncated_jpeg",
    "missing_image",
    "missing_png",
    "png_id_not_listed",
    "listed_id_absent",
    "unknown_category",
    "png_size_mismatch",
    "json_size_mismatch",
  ],
)
def test_bad_panoptic_example(tmp_path, case):
  raw = str(tmp_path / "raw")
  write_coco_panoptic(raw)
  file, reason = _corrupt(raw, case)
  with pytest.raises(ValueError, match=re.escape(file) + ": " + reason):
    prepare("coco_panoptic", raw, str(tmp_path / "strict"))
  builder, report = prepare("coco_panoptic", raw, str(tmp_path / "lenient"), skip_bad=True)
  assert report.skip_bad and report.examples == {"train": 1, "validation": 2}
  assert report.skipped_per_split == {"train": 0, "validation": 1}
  assert len(report.skipped) == 1 and report.skipped[0][0] == file
  assert re.match(reason, report.skipped[0][1])
  source = builder.as_data_source("validation")
  assert [int(source[i]["image_id"]) for i in range(len(source))] == [139, 632]
  # The report is stored with the data.
  assert prepare("coco_panoptic", raw, str(tmp_path / "lenient"))[1] == report


def test_orphan_panoptic_annotation_is_reported(tmp_path):
  raw = str(tmp_path / "raw")
  write_coco_panoptic(raw)
  json_path = os.path.join(raw, "annotations", "panoptic_val2017.json")
  with open(json_path) as f:
    data = json.load(f)
  data["images"].pop(1)  # image 285 keeps its annotation entry
  write_json(json_path, data)
  with pytest.raises(ValueError, match=re.escape(BAD_PNG) + ".*image_id 285"):
    prepare("coco_panoptic", raw, str(tmp_path / "strict"))
  _, report = prepare("coco_panoptic", raw, str(tmp_path / "lenient"), skip_bad=True)
  assert report.examples["validation"] == 2 and report.skipped[0][0].endswith(BAD_PNG)


def test_instance_training_skips_images_without_non_crowd_things(tmp_path):
  """detectron2's FILTER_EMPTY_ANNOTATIONS for instance datasets, counted, and only there."""
  scenes = coco_panoptic_scenes()
  val = scenes["val2017"]
  a, b, empty = val[0][2], val[1][2], val[2][2]
  scenes["train2017"] = [
    (1, 4, b, [(3_000_000, 193, 0), (42, 18, 0)]),  # dog: kept
    (2, 5, np.full((H, W), 3_000_000), [(3_000_000, 193, 0)]),  # stuff only
    (3, 6, np.where(a == 7, 0, a), [(0x30201, 187, 0), (70000, 1, 1)]),  # only a crowd
    (4, 7, empty, []),  # no segment at all
    (5, 8, a, [(0x30201, 187, 0), (7, 1, 0), (70000, 1, 1)]),  # a person: kept
  ]
  raw = str(tmp_path / "raw")
  write_coco_panoptic(raw, scenes)
  data_dir = str(tmp_path / "tfds")
  prepare("coco_panoptic", raw, data_dir)
  config = default_dataset_config()
  config.name, config.task, config.num_classes = "coco_panoptic", "instance", 80
  config.data_dir, config.crop_size, config.max_gt = data_dir, (32, 32), 4
  meta = dataset_metadata(config)
  np.testing.assert_array_equal(pipeline.nonempty_instance_records(config, meta), [0, 4])

  def image_ids_seen(config):
    loader = pipeline.create_train_loader(config, 2, seed=0, process_index=0, process_count=1)
    batches = [next(loader) for _ in range(5)]  # 10 examples: every record of 2 epochs
    return loader.num_filtered_empty, batches

  filtered, batches = image_ids_seen(config)
  assert filtered == 3
  for batch in batches:  # only images 1 and 5, each with a valid target
    assert batch["valid"].any(axis=1).all()
  config.filter_empty = False
  filtered, batches = image_ids_seen(config)
  assert filtered == 0
  assert not all(batch["valid"].any(axis=1).all() for batch in batches)
  # The panoptic task is never filtered.
  config.task, config.num_classes, config.filter_empty = "panoptic", 133, True
  assert image_ids_seen(config)[0] == 0


# ---------------------------------------------------------------------------------------------
# Instances.


def test_instances_read_back_with_overlaps_counted(tmp_path):
  raw = str(tmp_path / "raw")
  write_coco_instances(raw)
  builder, report = prepare("coco_instance", raw, str(tmp_path / "tfds"))
  assert builder.name == "coco_instance"
  person, dog = poly_mask(PERSON_POLY), poly_mask(DOG_POLY)
  assert dog.sum() < person.sum() and (dog & person).any() and (CAT & person).any()
  # Expected map: crowd first, then larger before smaller; ids 1..4 in JSON order.
  expected = np.zeros((H, W), np.int64)
  for mask, seg_id in ((CROWD, 3), (person, 1), (dog, 2), (CAT, 4)):
    expected[mask] = seg_id
  source = builder.as_data_source("validation")
  example = source[0]
  pan = panoptic_png.rgb_to_id(example["panoptic"])
  np.testing.assert_array_equal(pan, expected)
  assert pan[15, 25] == 2 and pan[5, 28] == 4 and pan[22, 8] == 1  # the smaller one wins
  got = example["segments"]
  assert [int(v) for v in got["id"]] == [1, 2, 3, 4]
  assert [int(v) for v in got["category_id"]] == [1, 18, 1, 17]
  assert [bool(v) for v in got["iscrowd"]] == [False, False, True, False]
  assert [int(v) for v in got["area"]] == [int(np.sum(expected == i)) for i in (1, 2, 3, 4)]
  assert example["file_name"] == b"val2017/000000000139.jpg"
  # The person lost its overlaps with the dog and the cat; the crowd lost its overlap with it.
  lost = int(np.sum(person & dog) + np.sum(person & CAT))
  counts = report.counts
  assert counts["overlap_pixels"] == lost > 0
  assert counts["overlap_images"] == [["val2017/000000000139.jpg", lost]]
  assert counts["crowd_pixels_covered"] == int(np.sum(CROWD & person)) > 0
  assert counts["empty_instances"] == 1 and counts["hidden_instances"] == 0
  # The image without annotations is kept.
  assert source[1]["image_id"] == 285 and len(source[1]["segments"]["id"]) == 0
  assert not panoptic_png.rgb_to_id(source[1]["panoptic"]).any()
  assert report.examples == {"train": 1, "validation": 2}
  assert int(builder.as_data_source("train")[0]["segments"]["category_id"][0]) == 18


def test_paint_instances_hides_and_breaks_ties():
  a = np.zeros((4, 4), bool)
  a[:2] = True
  b = a.copy()  # same size: the later one wins and `a` is hidden
  c = np.zeros((4, 4), bool)
  c[0, 0] = True
  canvas, stats = coco_builder.paint_instances([a, b, c], [False, False, False], (4, 4))
  assert canvas[0, 0] == 3 and canvas[1, 3] == 2 and not canvas[2:].any()
  assert stats["area"].tolist() == [0, 7, 1]
  assert stats["overlap_pixels"] == 8 + 1 and stats["crowd_pixels_covered"] == 0


def _edit_instances(raw, edit) -> None:
  json_path = os.path.join(raw, "annotations", "instances_val2017.json")
  with open(json_path) as f:
    data = json.load(f)
  edit(data)
  write_json(json_path, data)


def _bad_rle_size(data):
  data["annotations"][2]["segmentation"]["size"] = [H, W + 1]


def _bad_category(data):
  data["annotations"][1]["category_id"] = 92  # a stuff id: not an instance category


def _bad_image_size(data):
  data["images"][0]["height"] = H + 1


@pytest.mark.parametrize(
  "edit, reason",
  [
    (_bad_rle_size, "annotation 3 of .*: RLE size \\[32, 49\\]"),
    (_bad_category, "annotation 2 of .*: unknown category id 92"),
    (_bad_image_size, "image is 32x48 but the annotation JSON says \\(33, 48\\)"),
  ],
)
def test_bad_instance_example(tmp_path, edit, reason):
  raw = str(tmp_path / "raw")
  write_coco_instances(raw)
  _edit_instances(raw, edit)
  file = os.path.join(raw, "val2017", "000000000139.jpg")
  with pytest.raises(ValueError, match=re.escape(file) + ": " + reason):
    prepare("coco_instance", raw, str(tmp_path / "strict"))
  builder, report = prepare("coco_instance", raw, str(tmp_path / "lenient"), skip_bad=True)
  assert report.examples == {"train": 1, "validation": 1}
  assert len(report.skipped) == 1 and report.skipped[0][0] == file
  assert report.skipped_per_split == {"train": 0, "validation": 1}
  # Nothing counted for the skipped image.
  assert report.counts["overlap_pixels"] == 0 and report.counts["overlap_images"] == []
  assert builder.as_data_source("validation")[0]["image_id"] == 285


def test_wrong_annotation_file_fails_the_build(tmp_path):
  raw = str(tmp_path / "raw")
  write_coco_instances(raw)
  _edit_instances(raw, lambda d: d["categories"][0].update(name="human"))
  with pytest.raises(ValueError, match="category names differ"):
    prepare("coco_instance", raw, str(tmp_path / "tfds"), skip_bad=True)
  with pytest.raises(ValueError, match="dataset must be one of"):
    prepare("coco", raw, str(tmp_path / "tfds"))


def test_orphan_instance_annotation_is_reported(tmp_path):
  raw = str(tmp_path / "raw")
  write_coco_instances(raw)
  _edit_instances(raw, lambda d: d["annotations"].append({**d["annotations"][0], "image_id": 5}))
  json_path = os.path.join(raw, "annotations", "instances_val2017.json")
  with pytest.raises(
    ValueError, match=re.escape(json_path) + ": annotation 1 refers to image_id 5"
  ):
    prepare("coco_instance", raw, str(tmp_path / "strict"))
  _, report = prepare("coco_instance", raw, str(tmp_path / "lenient"), skip_bad=True)
  assert report.examples == {"train": 1, "validation": 2} and report.skipped[0][0] == json_path


def test_grayscale_jpeg_is_kept_and_cmyk_is_converted(tmp_path):
  raw = str(tmp_path / "raw")
  write_coco_instances(raw)
  gray_path = os.path.join(raw, "val2017", "000000000285.jpg")
  cmyk_path = os.path.join(raw, "train2017", "000000000009.jpg")
  Image.fromarray(coco_image(5)).convert("L").save(gray_path, format="JPEG", quality=95)
  Image.fromarray(coco_image(6)).convert("CMYK").save(cmyk_path, format="JPEG", quality=95)
  builder, report = prepare("coco_instance", raw, str(tmp_path / "tfds"))
  # Grayscale JPEGs keep their bytes and decode to three equal channels (detectron2 reads RGB).
  gray = builder.as_data_source("validation")[1]["image"]
  with Image.open(gray_path) as image:
    np.testing.assert_array_equal(gray, np.repeat(np.asarray(image)[..., None], 3, -1))
  # CMYK is converted to RGB as PIL (detectron2's reader) does, stored losslessly, and listed.
  assert report.reencoded_images == ["train2017/000000000009.jpg"]
  with Image.open(cmyk_path) as image:
    rgb = np.asarray(image.convert("RGB"))
  np.testing.assert_array_equal(builder.as_data_source("train")[0]["image"], rgb)
