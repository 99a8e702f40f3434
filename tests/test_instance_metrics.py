"""COCO mask AP on crafted predictions whose scores can be worked out by hand.

COCO's AP per IoU threshold: detections sorted by score give cumulative precision/recall; the
precision is made non-increasing from the right (`p[i] = max(p[i:])`); at each of the 101
recall points r = 0, 0.01, ..., 1 the precision of the first detection with recall >= r is
taken (0 if none reaches r); AP is their mean. A detection matches an unmatched GT with
IoU >= the threshold; AP averages the 10 thresholds 0.50, 0.55, ..., 0.95.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpformer_jax.evaluation.instance import (
  InstanceEvaluator,
  coco_instance_results,
  encode_masks,
  evaluate_instances,
  instance_ground_truth,
)

SIZE = 128
THINGS = (1, 3)  # category ids of the things; 9 is stuff
NAMES = {1: "cat", 3: "dog", 9: "grass"}
LABEL_TO_CATEGORY = (1, 3)  # training label 0 -> category 1, label 1 -> category 3


def _box(y0, y1, x0, x1):
  mask = np.zeros((SIZE, SIZE), bool)
  mask[y0:y1, x0:x1] = True
  return mask


def _scene(boxes):
  """Segment map and segments of `[(box, category_id, iscrowd)]`; later boxes paint over."""
  segment_map = np.zeros((SIZE, SIZE), np.int32)
  segments = []
  for i, (box, category_id, iscrowd) in enumerate(boxes, start=1):
    segment_map[box] = i
    segments.append({"id": i, "category_id": category_id, "iscrowd": iscrowd})
  return segment_map, segments


def _evaluate(scenes, predictions):
  """`scenes`: {image_id: boxes}; `predictions`: {image_id: [(mask, score, label)]}."""
  gt = instance_ground_truth([(i, *_scene(boxes)) for i, boxes in scenes.items()], THINGS, NAMES)
  results = []
  for image_id, preds in predictions.items():
    masks = np.stack([m for m, _, _ in preds]) if preds else np.zeros((0, SIZE, SIZE), bool)
    scores = [s for _, s, _ in preds]
    labels = [lab for _, _, lab in preds]
    results += coco_instance_results(image_id, masks, scores, labels, LABEL_TO_CATEGORY)
  return evaluate_instances(gt, results)


# Areas: small <= 32^2 = 1024 < medium <= 96^2 = 9216 < large.
SMALL = _box(0, 20, 0, 20)  # 400 px
MEDIUM = _box(30, 80, 30, 80)  # 2500 px
LARGE = _box(10, 110, 10, 110)  # 10000 px
STUFF = _box(100, 128, 0, 128)


# pycocotools' decode trips numpy 2's `__array__(copy=...)` deprecation; only this test decodes.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_encode_masks_round_trips_and_serialises():
  rng = np.random.default_rng(0)
  masks = rng.uniform(size=(3, 17, 23)) < 0.3
  rles = encode_masks(masks)
  json.dumps(rles)
  from pycocotools import mask as mask_util

  decoded = mask_util.decode(rles)  # [H, W, N]
  np.testing.assert_array_equal(decoded.transpose(2, 0, 1), masks)
  assert encode_masks(np.zeros((0, 4, 4), bool)) == []


def test_ground_truth_keeps_things_with_area_bbox_and_crowd():
  segment_map, segments = _scene([(STUFF, 9, 0), (MEDIUM, 1, 0), (SMALL, 3, 1)])
  segments.append({"id": 7, "category_id": 1, "iscrowd": 0})  # no pixel: dropped
  gt = instance_ground_truth([(5, segment_map, segments)], THINGS, NAMES)
  assert gt["images"] == [{"id": 5, "height": SIZE, "width": SIZE}]
  assert gt["categories"] == [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
  anns = gt["annotations"]
  assert [(a["id"], a["category_id"], a["iscrowd"], a["area"]) for a in anns] == [
    (1, 1, 0, 2500),
    (2, 3, 1, 400),
  ]
  assert anns[0]["bbox"] == [30.0, 30.0, 50.0, 50.0]  # [x, y, w, h]
  assert anns[1]["bbox"] == [0.0, 0.0, 20.0, 20.0]
  json.dumps(gt)


def test_perfect_predictions_score_100():
  scenes = {1: [(SMALL, 1, 0), (MEDIUM, 3, 0)], 2: [(LARGE, 1, 0)]}
  preds = {1: [(SMALL, 1.0, 0), (MEDIUM, 1.0, 1)], 2: [(LARGE, 1.0, 0)]}
  got = _evaluate(scenes, preds)
  for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP-cat", "AP-dog"):
    assert got[key] == pytest.approx(100.0), key


def test_false_positive_and_miss_interpolated_ap():
  # 3 GT cats; detections by score: TP (0.9), FP (0.8, on empty background), TP (0.7); the
  # third GT is missed. Every TP is exact, so all 10 IoU thresholds give the same AP.
  a, b, c = _box(0, 20, 0, 20), _box(0, 20, 40, 60), _box(60, 80, 0, 20)
  fp = _box(100, 120, 100, 120)
  scenes = {1: [(a, 1, 0), (b, 1, 0), (c, 1, 0)]}
  preds = {1: [(a, 0.9, 0), (fp, 0.8, 0), (b, 0.7, 0)]}
  got = _evaluate(scenes, preds)
  # recall [1/3, 1/3, 2/3], precision [1, 1/2, 2/3] -> non-increasing envelope [1, 2/3, 2/3].
  # Recall points 0.00..0.33 (34 points) reach the first detection: precision 1;
  # 0.34..0.66 (33 points) first reach recall 2/3 at the third: 2/3; 0.67..1.00 (34): 0.
  # AP = (34 * 1 + 33 * 2/3) / 101 = 56 / 101.
  expected = 100 * 56 / 101
  for key in ("AP", "AP50", "AP75", "APs", "AP-cat"):
    assert got[key] == pytest.approx(expected), key
  assert np.isnan(got["APm"]) and np.isnan(got["APl"])  # no GT of those sizes
  assert np.isnan(got["AP-dog"])  # no dog at all


def test_partial_overlap_counts_at_ap50_not_ap75():
  # GT 40 x 50 = 2000 px; the prediction is its top 25 rows: 1250 px inside it, so
  # IoU = 1250 / 2000 = 0.625. (Exactly 0.6 would sit on COCO's 0.60 threshold, where
  # matching depends on float rounding.) It matches at 0.50, 0.55, 0.60 and not from 0.65.
  gt = _box(20, 60, 30, 80)
  pred = _box(20, 45, 30, 80)
  got = _evaluate({1: [(gt, 3, 0)]}, {1: [(pred, 0.5, 1)]})
  assert got["AP50"] == pytest.approx(100.0)
  assert got["AP75"] == pytest.approx(0.0)
  assert got["AP"] == pytest.approx(30.0)  # 3 of 10 thresholds at AP 100


def test_prediction_on_crowd_region_is_not_a_false_positive():
  person, crowd = _box(0, 30, 0, 30), _box(60, 120, 60, 120)
  inside_crowd = _box(70, 100, 70, 100)
  preds = {1: [(inside_crowd, 0.95, 0), (person, 0.9, 0)]}
  with_crowd = _evaluate({1: [(person, 1, 0), (crowd, 1, 1)]}, preds)
  assert with_crowd["AP"] == pytest.approx(100.0)
  # Without the crowd annotation the same detection is a false positive ranked first:
  # recall [0, 1], precision [0, 1/2] -> envelope [1/2, 1/2]; all 101 recall points get 1/2.
  without = _evaluate({1: [(person, 1, 0)]}, preds)
  assert without["AP"] == pytest.approx(50.0)


def test_size_buckets():
  # Image 1: a small and a medium cat; image 2: a large cat. The medium one is missed.
  scenes = {1: [(SMALL, 1, 0), (MEDIUM, 1, 0)], 2: [(LARGE, 1, 0)]}
  preds = {1: [(SMALL, 0.9, 0)], 2: [(LARGE, 0.8, 0)]}
  got = _evaluate(scenes, preds)
  assert got["APs"] == pytest.approx(100.0)
  assert got["APm"] == pytest.approx(0.0)
  assert got["APl"] == pytest.approx(100.0)
  # All sizes: recall [1/3, 2/3] at precision 1: recall points 0.00..0.66 (67 of 101) get 1.
  assert got["AP"] == pytest.approx(100 * 67 / 101)


def test_no_predictions_scores_zero():
  scenes = {1: [(SMALL, 1, 0), (MEDIUM, 3, 0)], 2: [(LARGE, 1, 0)]}
  got = _evaluate(scenes, {})
  for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP-cat", "AP-dog"):
    assert got[key] == 0.0, key


def test_results_are_not_modified():
  gt = instance_ground_truth([(1, *_scene([(SMALL, 1, 0)]))], THINGS, NAMES)
  results = coco_instance_results(1, SMALL[None], [0.5], [0], LABEL_TO_CATEGORY)
  before = json.dumps(results)
  evaluate_instances(gt, results)
  assert json.dumps(results) == before


def test_evaluator_merges_states():
  scenes = {1: [(SMALL, 1, 0), (MEDIUM, 3, 0)], 2: [(STUFF, 9, 0), (LARGE, 1, 0)]}
  preds = {1: [(SMALL, 0.9, 0), (MEDIUM, 0.3, 0)], 2: [(LARGE, 0.8, 0), (STUFF, 0.2, 1)]}
  one = InstanceEvaluator(THINGS, LABEL_TO_CATEGORY, NAMES)
  parts = [InstanceEvaluator(THINGS, LABEL_TO_CATEGORY, NAMES) for _ in range(2)]
  for part, image_id in zip(parts, (1, 2), strict=True):
    segment_map, segments = _scene(scenes[image_id])
    masks = np.stack([m for m, _, _ in preds[image_id]])
    scores = [s for _, s, _ in preds[image_id]]
    labels = [lab for _, _, lab in preds[image_id]]
    for evaluator in (one, part):
      evaluator.add(image_id, segment_map, segments, masks, scores, labels)
  merged = InstanceEvaluator(THINGS, LABEL_TO_CATEGORY, NAMES)
  for part in parts:
    merged.merge(json.loads(json.dumps(part.state())))  # as if gathered from processes
  got = merged.compute()
  assert not any(np.isnan(v) for v in got.values())
  assert got == one.compute()
  assert got == _evaluate(scenes, preds)
  merged.merge(parts[0].state())
  with pytest.raises(ValueError, match="more than once"):
    merged.compute()
