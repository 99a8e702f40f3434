"""The procedural scene generator and its TFDS builder (built offline, read back without TF)."""

from __future__ import annotations

import colorsys
import os
import sys

import numpy as np
import pytest
from scipy.spatial import ConvexHull

from mpformer_jax.data import panoptic_png, synthetic_shapes

SIZE = (64, 64)
NUM_TRAIN, NUM_VAL = 16, 8


def test_scene_is_deterministic_by_seed_and_index():
  a = synthetic_shapes.generate_scene(3, 5, SIZE)
  b = synthetic_shapes.generate_scene(3, 5, SIZE)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["panoptic"], b["panoptic"])
  assert a["segments"] == b["segments"]
  for other in (
    synthetic_shapes.generate_scene(3, 6, SIZE),
    synthetic_shapes.generate_scene(4, 5, SIZE),
  ):
    assert not np.array_equal(a["image"], other["image"])


def test_scene_annotations_are_consistent():
  categories = {c["id"]: c for c in synthetic_shapes.CATEGORIES}
  assert sum(c["isthing"] for c in categories.values()) >= 4
  assert sum(not c["isthing"] for c in categories.values()) >= 3
  seen = set()
  for index in range(24):
    scene = synthetic_shapes.generate_scene(0, index, SIZE, max_instances=6)
    image, pan, segments = scene["image"], scene["panoptic"], scene["segments"]
    assert image.shape == (*SIZE, 3) and image.dtype == np.uint8
    assert pan.shape == SIZE and pan.dtype == np.int32
    ids = [s["id"] for s in segments]
    assert len(set(ids)) == len(ids) and all(0 < i < 2**24 for i in ids)
    # Every labelled pixel belongs to a listed segment; the rest is void.
    assert set(np.unique(pan)) - {0} == set(ids)
    stuff = [s for s in segments if not categories[s["category_id"]]["isthing"]]
    things = [s for s in segments if categories[s["category_id"]]["isthing"]]
    assert segments == stuff + things  # stuff regions first
    assert 1 <= len(stuff) <= 3 and len({s["category_id"] for s in stuff}) == len(stuff)
    assert len(things) <= 6
    for s in segments:
      assert s["area"] == int(np.sum(pan == s["id"])) >= 16
      assert s["iscrowd"] is False
      seen.add(s["category_id"])
    # The id map shows the top-most shape: each thing's visible pixels have its class's hue.
    for s in things:
      mean_rgb = image[pan == s["id"]].reshape(-1, 3).mean(0) / 255.0
      hue = colorsys.rgb_to_hsv(*mean_rgb)[0]
      expected = synthetic_shapes._APPEARANCE[s["category_id"]][0]
      assert min(abs(hue - expected), 1 - abs(hue - expected)) < 0.06, (index, s)
  assert seen == set(categories)  # every class occurs in a couple of dozen scenes


def test_scenes_contain_occlusions_and_void():
  """Later shapes occlude earlier ones; segments below `min_area` become void."""
  occluded = void = 0
  convex = {1, 2, 4}  # circle, square, triangle (also convex after cropping at the border)
  for index in range(40):
    scene = synthetic_shapes.generate_scene(1, index, SIZE, max_instances=8, min_area=16)
    void += int(np.any(scene["panoptic"] == 0))
    for s in scene["segments"]:
      if s["category_id"] in convex:
        ys, xs = np.nonzero(scene["panoptic"] == s["id"])
        points = np.stack([xs, ys], 1).astype(np.float64)
        # A visible part much smaller than its convex hull has a bite taken out of it.
        if len(points) >= 3 and np.ptp(xs) and np.ptp(ys):
          occluded += int(s["area"] < 0.8 * ConvexHull(points).volume)
  assert occluded > 0
  assert void > 0


def test_panoptic_png_coding_round_trips():
  ids = np.array([[0, 1, 255], [256, 65535, 65536], [2**24 - 1, 123456, 7]], np.int32)
  rgb = panoptic_png.id_to_rgb(ids)
  assert rgb.dtype == np.uint8 and rgb.shape == (3, 3, 3)
  np.testing.assert_array_equal(rgb[1, 2], [0, 0, 1])  # 65536 = 256**2 -> blue
  np.testing.assert_array_equal(panoptic_png.rgb_to_id(rgb), ids)
  with pytest.raises(ValueError, match="2\\*\\*24"):
    panoptic_png.id_to_rgb(np.array([2**24]))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  tf_before = "tensorflow" in sys.modules
  from mpformer_jax.data import synthetic_builder

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = synthetic_builder.ensure_built(data_dir, SIZE, NUM_TRAIN, NUM_VAL, max_instances=6)
  return data_dir, builder, tf_before


def test_builder_reads_back_the_generator_output_without_tensorflow(built):
  import tensorflow_datasets as tfds

  data_dir, builder, tf_before = built
  name = f"synthetic_shapes/{builder.builder_config.name}"
  for split, seed, count in (("train", 0, NUM_TRAIN), ("validation", 1, NUM_VAL)):
    source = tfds.data_source(name, data_dir=data_dir, split=split)
    assert len(source) == count
    for index in range(count):
      example = source[index]
      scene = synthetic_shapes.generate_scene(seed, index, SIZE, max_instances=6)
      assert example["image_id"] == index
      np.testing.assert_array_equal(example["image"], scene["image"])  # PNG is lossless
      np.testing.assert_array_equal(panoptic_png.rgb_to_id(example["panoptic"]), scene["panoptic"])
      segments = example["segments"]
      for key in ("id", "category_id", "area", "iscrowd"):
        assert [v.item() for v in segments[key]] == [s[key] for s in scene["segments"]]
  if not tf_before:
    assert "tensorflow" not in sys.modules


def test_ensure_built_reuses_the_data(built):
  from mpformer_jax.data import synthetic_builder

  data_dir, builder, _ = built
  files = sorted(p for p in os.listdir(builder.data_dir))
  stamps = [os.stat(os.path.join(builder.data_dir, f)).st_mtime_ns for f in files]
  again = synthetic_builder.ensure_built(data_dir, SIZE, NUM_TRAIN, NUM_VAL, max_instances=6)
  assert again.data_dir == builder.data_dir
  assert sorted(os.listdir(again.data_dir)) == files
  assert [os.stat(os.path.join(again.data_dir, f)).st_mtime_ns for f in files] == stamps
  # A different size is a different config, in its own directory.
  other = synthetic_builder.make_config((32, 32), NUM_TRAIN, NUM_VAL)
  assert other.name != builder.builder_config.name
  assert synthetic_builder.categories() == [dict(c) for c in synthetic_shapes.CATEGORIES]
