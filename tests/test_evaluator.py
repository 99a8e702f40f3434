"""The evaluation loop's host side: ground truth decoding, metric accumulation, gathering.

Predictions built from the ground truth itself must score 100 on every metric; a corrupted copy
must score less, by amounts checked against `pq_compute` and a direct confusion count.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpformer_jax.data import pipeline
from mpformer_jax.data.metadata import dataset_metadata
from mpformer_jax.evaluation import evaluator, postprocess
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


class _FixedOutputs(nn.Module):
  """Stands in for the network: returns given class and mask logits (the step under test is
  the post-processing around it)."""

  logits: np.ndarray
  masks: np.ndarray

  @nn.compact
  def __call__(self, images, train=False):
    del images, train
    return {"pred_logits": jnp.asarray(self.logits), "pred_masks": jnp.asarray(self.masks)}


@pytest.mark.parametrize("task", ["panoptic", "semantic"])
def test_predictions_are_scored_at_the_original_size_like_the_reference(task):
  """Upsample to the padded input, crop, resize to the original size (torch), then infer.

  Panoptic runs resize the mask logits before inference; semantic runs resize the per-class
  scores after it (the reference's `sem_seg_postprocess_before_inference`).
  """
  import torch
  import torch.nn.functional as F

  config = pipeline.default_dataset_config()
  config.task = task
  meta = dataset_metadata(config)
  k, q = meta.num_classes, 12
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, q, k + 1)).astype(np.float32) * 3
  # Each query owns some 2 x 2 cells of the low-resolution masks, so that panoptic inference
  # keeps several segments.
  owner = rng.integers(0, q, size=(3, 1, 4, 5)).repeat(2, 2).repeat(2, 3)
  masks = rng.normal(size=(3, q, 8, 10)) + np.where(owner == np.arange(q)[:, None, None], 4, -4)
  masks = masks.astype(np.float32)
  canvas, out_size = (32, 40), (45, 52)
  resized = np.array([[32, 40], [24, 30], [0, 0]], np.int32)  # the last: a padding example
  original = np.array([[45, 52], [19, 37], [0, 0]], np.int32)
  settings = evaluator.EvalSettings(object_mask_threshold=0.5)  # a few queries more
  predict = evaluator.make_predict_fn(_FixedOutputs(logits, masks), meta, settings, out_size)
  semantic_gt = np.full((3, *out_size), evaluator.IGNORE_LABEL, np.int32)
  semantic_gt[0, :10, :10] = 1  # a few labelled pixels, so the confusion matrix is used
  images = np.zeros((3, *canvas, 3), np.float32)
  out = jax.jit(predict)({}, images, resized, original, semantic_gt)
  out = jax.tree.map(np.asarray, out)
  assert out["semantic"].shape == (3, *out_size)
  assert (out["semantic"][2] == -1).all()  # nothing of a padding example is scored
  for b in range(2):
    (rh, rw), (oh, ow) = resized[b], original[b]
    up = F.interpolate(torch.from_numpy(masks[b : b + 1]), canvas, mode="bilinear")
    cls = torch.softmax(torch.from_numpy(logits[b]), -1)[:, :-1]
    if task == "semantic":
      scores = torch.einsum("qk,qhw->khw", cls, up[0].sigmoid())[None, :, :rh, :rw]
      want = F.interpolate(scores, (oh, ow), mode="bilinear")[0].argmax(0).numpy()
    else:
      logit = F.interpolate(up[:, :, :rh, :rw], (oh, ow), mode="bilinear")[0]
      want = torch.einsum("qk,qhw->khw", cls, logit.sigmoid()).argmax(0).numpy()
      # Panoptic inference on the torch-resized logits (checked against the reference loop in
      # test_postprocess) gives our map.
      ref = postprocess.panoptic_inference(
        logits[b : b + 1], logit.numpy()[None], np.asarray(meta.label_isthing), 0.5
      )
      assert len(np.unique(ref.segment_map)) >= 4  # void and at least three segments
      np.testing.assert_array_equal(
        out["panoptic"]["segment_map"][b, :oh, :ow], np.asarray(ref.segment_map[0])
      )
      assert not out["panoptic"]["segment_map"][b, oh:].any()
    got = out["semantic"][b, :oh, :ow]
    assert (got == want).mean() > 0.999, (got != want).sum()  # float ties at most
    assert (out["semantic"][b, oh:] == -1).all() and (out["semantic"][b, :, ow:] == -1).all()
  assert int(out["confusion"].confusion().sum()) == 100


def test_a_dataset_semantic_annotation_is_scored_instead_of_the_panoptic_map(eval_data):
  meta, batches = eval_data
  batch = dict(batches[0])
  from_panoptic = evaluator.semantic_targets(batch, meta)
  np.testing.assert_array_equal(from_panoptic, evaluator.batch_semantic_ground_truth(batch, meta))
  assert (from_panoptic != evaluator.IGNORE_LABEL).any()
  own = np.full_like(from_panoptic, 3)
  batch["semantic_gt"] = own
  assert evaluator.semantic_targets(batch, meta) is own
  assert pipeline.SEMANTIC_IGNORE == evaluator.IGNORE_LABEL
