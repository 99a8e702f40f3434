"""The evaluation loop's host side: ground truth decoding, metric accumulation, gathering.

Predictions built from the ground truth itself must score 100 on every metric; a corrupted copy
must score less, by amounts checked against `pq_compute` and a direct confusion count.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpformer_jax.data import pipeline
from mpformer_jax.data.metadata import dataset_metadata
from mpformer_jax.evaluation import evaluator
from mpformer_jax.evaluation.panoptic import pq_compute

QUERIES = 40  # >= eval_max_segments, so every GT segment can have its own query


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
  config = pipeline.default_dataset_config()
  config.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.synthetic.image_size = (64, 64)
  config.synthetic.num_train, config.synthetic.num_validation = 8, 6
  config.crop_size = config.eval_size = (64, 64)
  loader = pipeline.create_eval_loader(config, global_batch_size=4, process_count=1)
  batches = list(loader)
  return dataset_metadata(config), batches


def outputs_from_ground_truth(batch, meta, drop_label=None):
  """Host "predictions" equal to the ground truth (optionally without one class)."""
  b, h, w = batch["panoptic"].shape
  seg_map = np.zeros((b, h, w), np.int32)
  seg_labels = np.full((b, QUERIES), -1, np.int32)
  semantic = np.zeros((b, h, w), np.int32)
  inst_masks = np.zeros((b, 100, h, w), bool)
  inst_scores = np.full((b, 100), -np.inf, np.float32)
  inst_labels = np.zeros((b, 100), np.int32)
  inst_valid = np.zeros((b, 100), bool)
  for i in range(b):
    for n, s in enumerate(evaluator.gt_segments(batch, i, meta)):
      if s["label"] == drop_label:
        continue
      mask = batch["panoptic"][i] == s["id"]
      seg_map[i][mask] = n + 1
      seg_labels[i, n] = s["label"]
      semantic[i][mask] = s["label"]
      if meta.label_isthing[s["label"]]:
        inst_masks[i, n], inst_scores[i, n], inst_labels[i, n] = mask, 1.0, s["label"]
        inst_valid[i, n] = True
  return {
    "semantic": semantic,
    "panoptic": {
      "segment_map": seg_map,
      "segment_labels": seg_labels,
      "segment_scores": np.where(seg_labels >= 0, 1.0, 0.0).astype(np.float32),
    },
    "instance": {
      "masks": inst_masks,
      "scores": inst_scores,
      "labels": inst_labels,
      "valid": inst_valid,
    },
  }


def add(accumulator, batch, outputs, meta):
  """What `evaluator.evaluate` does with one batch, given host "predictions"."""
  from mpformer_jax.evaluation.semantic import ConfusionMatrix

  metric = ConfusionMatrix.configure(meta.num_classes, evaluator.IGNORE_LABEL, meta.label_names)
  gt = evaluator.batch_semantic_ground_truth(batch, meta)
  accumulator.add_confusion(
    metric.from_model_output(sem_seg_pred=outputs["semantic"], sem_seg_gt=gt)
  )
  accumulator.add_batch(batch, outputs)


def test_ground_truth_as_prediction_scores_100(eval_data):
  meta, batches = eval_data
  accumulator = evaluator.MetricsAccumulator(meta)
  for batch in batches:
    add(accumulator, batch, outputs_from_ground_truth(batch, meta), meta)
  results = accumulator.compute()
  assert results["num_images"] == 6  # the padded examples of the last batch are not counted
  for key in ("PQ", "SQ", "RQ", "mIoU", "pACC", "AP", "AP50", "AP75"):
    assert results[key] == pytest.approx(100.0), (key, results)


def test_a_missing_class_lowers_pq_and_miou_as_computed_independently(eval_data):
  meta, batches = eval_data
  dropped = 5  # the first stuff class ("sky")
  assert not meta.label_isthing[dropped]
  accumulator = evaluator.MetricsAccumulator(meta)
  gt_pairs, pred_pairs = [], []
  confusion = np.zeros((meta.num_classes,) * 2, np.int64)
  for batch in batches:
    outputs = outputs_from_ground_truth(batch, meta, drop_label=dropped)
    add(accumulator, batch, outputs, meta)
    for i in np.flatnonzero(batch["is_real"]):
      segments = evaluator.gt_segments(batch, i, meta)
      gt_pairs.append((batch["panoptic"][i], segments))
      ids = outputs["panoptic"]["segment_map"][i]
      labels = outputs["panoptic"]["segment_labels"][i]
      pred_segments = [
        {"id": q + 1, "category_id": meta.label_category_ids[labels[q]]}
        for q in np.flatnonzero(labels >= 0)
        if np.any(ids == q + 1)
      ]
      pred_pairs.append((ids, pred_segments))
      gt_sem = evaluator.semantic_ground_truth(batch["panoptic"][i], segments)
      for g, p in zip(gt_sem.ravel(), outputs["semantic"][i].ravel(), strict=True):
        if g != evaluator.IGNORE_LABEL:
          confusion[g, p] += 1
  results = accumulator.compute()
  expected = pq_compute(gt_pairs, pred_pairs, meta.categories)
  assert 0 < results["PQ"] < 100
  assert results["PQ"] == pytest.approx(100 * expected["All"]["pq"])
  assert results["PQ_st"] == pytest.approx(100 * expected["Stuff"]["pq"])
  assert results["PQ_th"] == pytest.approx(100.0)
  present = confusion.sum(1) + confusion.sum(0) > 0
  iou = np.diag(confusion) / np.maximum(confusion.sum(0) + confusion.sum(1) - np.diag(confusion), 1)
  assert results["mIoU"] == pytest.approx(100 * iou[present].mean())
  assert results["AP"] == pytest.approx(100.0)  # things untouched


def test_semantic_ground_truth_maps_void_and_unlisted_ids_to_ignore():
  pan = np.array([[0, 3, 3], [7, 9, 7]])
  segments = [{"id": 3, "label": 2}, {"id": 7, "label": 0}]
  np.testing.assert_array_equal(
    evaluator.semantic_ground_truth(pan, segments), [[255, 2, 2], [0, 255, 0]]
  )
  np.testing.assert_array_equal(evaluator.semantic_ground_truth(pan, []), np.full((2, 3), 255))
