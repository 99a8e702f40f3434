"""Semantic metrics: the device confusion matrix, detectron2's scores and the CLU metric."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpformer_jax.evaluation import semantic
from mpformer_jax.evaluation.semantic import confusion_matrix, semantic_metrics


def _reference_confusion(pred, gt, k, ignore_label, valid):
  """Pixel-by-pixel numpy re-derivation (np.add.at), rows gt, columns pred."""
  conf = np.zeros((k, k), np.int64)
  pixel_valid = np.broadcast_to(
    valid.reshape(valid.shape + (1,) * (gt.ndim - valid.ndim)), gt.shape
  )
  use = pixel_valid & (gt != ignore_label) & (gt >= 0) & (gt < k)
  np.add.at(conf, (gt[use], pred[use]), 1)
  return conf


def _random_batch(seed, batch=4, size=(9, 13), k=5, ignore_label=255):
  rng = np.random.default_rng(seed)
  gt = rng.integers(0, k, (batch, *size))
  gt[rng.uniform(size=gt.shape) < 0.2] = ignore_label
  # Predictions agree with the gt on about half the pixels, so the diagonal is not trivial.
  pred = np.where(rng.uniform(size=gt.shape) < 0.5, gt % k, rng.integers(0, k, gt.shape))
  return pred.astype(np.int32), gt.astype(np.int32)


@pytest.mark.parametrize("valid_kind", ["none", "image", "pixel"])
def test_confusion_matrix_equals_numpy(valid_kind):
  k, ignore = 5, 255
  pred, gt = _random_batch(0, k=k, ignore_label=ignore)
  rng = np.random.default_rng(1)
  if valid_kind == "none":
    valid, ref_valid = None, np.ones(gt.shape[0], bool)
  elif valid_kind == "image":
    valid = ref_valid = np.array([True, False, True, False])
  else:
    valid = ref_valid = rng.uniform(size=gt.shape) < 0.7
  got = confusion_matrix(jnp.asarray(pred), jnp.asarray(gt), k, ignore, valid)
  ref = _reference_confusion(pred, gt, k, ignore, ref_valid)
  assert got.dtype == jnp.int32 and got.shape == (k, k)
  np.testing.assert_array_equal(np.asarray(got), ref)
  if valid_kind == "image":  # the invalid images do change the counts
    full = _reference_confusion(pred, gt, k, ignore, np.ones(4, bool))
    assert ref.sum() < full.sum()


def test_confusion_matrix_ignores_out_of_range_gt_and_pred():
  gt = np.array([[[0, 1, 2, -1, 3, 7]]])
  pred = np.array([[[0, 2, 2, 0, 1, 0]]])
  pred_out = np.array([[[0, 5, -2, 0, 1, 0]]])  # class 1 and 2 pixels predicted out of range
  # Classes 0..2 only (K = 3): gt -1 and 3 are outside the label space, 7 is the ignore label.
  got = np.asarray(confusion_matrix(pred, gt, 3, ignore_label=7))
  np.testing.assert_array_equal(got, [[1, 0, 0], [0, 0, 1], [0, 0, 1]])
  got = np.asarray(confusion_matrix(pred_out, gt, 3, ignore_label=7))
  np.testing.assert_array_equal(got, [[1, 0, 0], [0, 0, 0], [0, 0, 0]])


def test_confusion_matrix_jits_with_fixed_shapes():
  k = 4
  fn = jax.jit(lambda p, g, v: confusion_matrix(p, g, k, 255, v))
  for seed in range(2):  # same shapes: one compilation serves different data
    pred, gt = _random_batch(seed, k=k)
    valid = np.array([True, True, False, True])
    got = fn(pred, gt, valid)
    np.testing.assert_array_equal(np.asarray(got), _reference_confusion(pred, gt, k, 255, valid))
  assert fn._cache_size() == 1


def test_semantic_metrics_hand_computed():
  # 4 classes: 0 and 1 occur in the gt, 2 is only predicted, 3 occurs nowhere.
  # Rows gt, columns pred:
  conf = np.array(
    [
      [6, 2, 2, 0],  # gt 0: 10 px, 6 right, 2 -> class 1, 2 -> class 2
      [1, 3, 0, 0],  # gt 1: 4 px, 3 right
      [0, 0, 0, 0],
      [0, 0, 0, 0],
    ]
  )
  got = semantic_metrics(conf, ["a", "b", "c", "d"])
  # gt counts [10, 4, 0, 0], pred counts [7, 5, 2, 0], tp [6, 3, 0, 0].
  # IoU a = 6 / (10 + 7 - 6) = 6/11; IoU b = 3 / (4 + 5 - 3) = 3/6 = 1/2.
  # c is predicted but absent from the gt: IoU NaN, yet it counts in the mIoU denominator;
  # d occurs nowhere and is left out: mIoU = (6/11 + 1/2 + 0) / 3 = (23/22) / 3 = 23/66.
  iou_a, iou_b = 6 / 11, 1 / 2
  assert got["mIoU"] == pytest.approx(100 * 23 / 66)
  # fwIoU weights by gt share: 10/14 * 6/11 + 4/14 * 1/2 = 60/154 + 2/14 = 60/154 + 22/154.
  assert got["fwIoU"] == pytest.approx(100 * 82 / 154)
  # ACC a = 6/10, ACC b = 3/4; mACC over gt classes only = (0.6 + 0.75) / 2 = 0.675.
  assert got["mACC"] == pytest.approx(67.5)
  # pACC = (6 + 3) / 14.
  assert got["pACC"] == pytest.approx(100 * 9 / 14)
  assert got["IoU-a"] == pytest.approx(100 * iou_a)
  assert got["IoU-b"] == pytest.approx(100 * iou_b)
  assert got["ACC-a"] == pytest.approx(60.0)
  assert got["ACC-b"] == pytest.approx(75.0)
  for name in "cd":
    assert np.isnan(got[f"IoU-{name}"]) and np.isnan(got[f"ACC-{name}"])
  assert all(isinstance(v, float) for v in got.values())


def test_semantic_metrics_three_classes_one_absent():
  # 3 classes, class 2 in neither gt nor predictions: it is excluded from every mean.
  conf = np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]])
  got = semantic_metrics(conf)
  # IoU 0 = 3 / (4 + 3 - 3) = 3/4; IoU 1 = 4 / (4 + 5 - 4) = 4/5; mIoU = (0.75 + 0.8) / 2.
  assert got["mIoU"] == pytest.approx(77.5)
  # fwIoU = 4/8 * 3/4 + 4/8 * 4/5 = 0.375 + 0.4.
  assert got["fwIoU"] == pytest.approx(77.5)
  # ACC 0 = 3/4, ACC 1 = 4/4: mACC = 0.875; pACC = 7/8.
  assert got["mACC"] == pytest.approx(87.5)
  assert got["pACC"] == pytest.approx(87.5)
  assert np.isnan(got["IoU-2"]) and np.isnan(got["ACC-2"])


def test_semantic_metrics_empty_is_nan():
  got = semantic_metrics(np.zeros((2, 2), np.int64))
  assert all(np.isnan(v) for v in got.values())


def test_clu_metric_merges_and_jits():
  from clu import metrics as clu_metrics

  k = 5
  metric_cls = semantic.ConfusionMatrix.configure(num_classes=k, class_names=list("abcde"))
  collection_cls = clu_metrics.Collection.create(sem_seg=metric_cls)
  pred, gt = _random_batch(3, batch=6, k=k)
  valid = np.array([True, True, False, True, True, True])

  @jax.jit
  def update(metrics, p, g, v):
    return metrics.merge(
      collection_cls.single_from_model_output(sem_seg_pred=p, sem_seg_gt=g, mask=v)
    )

  merged = collection_cls.empty()
  for sl in (slice(0, 3), slice(3, 6)):
    merged = update(merged, pred[sl], gt[sl], valid[sl])
  whole = collection_cls.single_from_model_output(sem_seg_pred=pred, sem_seg_gt=gt, mask=valid)
  ref = _reference_confusion(pred, gt, k, 255, valid)
  np.testing.assert_array_equal(merged.sem_seg.confusion(), ref)
  np.testing.assert_array_equal(whole.sem_seg.confusion(), ref)
  assert (
    merged.compute()["sem_seg"]
    == whole.compute()["sem_seg"]
    == semantic_metrics(ref, list("abcde"))
  )
  assert merged.compute_values()["sem_seg"].value == pytest.approx(semantic_metrics(ref)["mIoU"])


def test_clu_metric_counts_past_int32():
  metric_cls = semantic.ConfusionMatrix.configure(num_classes=2)
  big = jnp.full((2, 2), 2**31 - 1, jnp.int32)  # each count at the int32 limit
  low, high = big & ((1 << 30) - 1), big >> 30
  one = metric_cls(low=low, high=high)
  total = jax.jit(lambda a: a.merge(a).merge(a))(one)
  np.testing.assert_array_equal(total.confusion(), np.full((2, 2), 3 * (2**31 - 1), np.int64))


def test_clu_metric_reduces_across_devices():
  k = 3
  metric_cls = semantic.ConfusionMatrix.configure(num_classes=k)
  n = jax.device_count()
  pred, gt = _random_batch(4, batch=2 * n, size=(4, 6), k=k)
  sharded = jax.vmap(lambda p, g: metric_cls.from_model_output(p, g))(
    pred.reshape(n, 2, 4, 6), gt.reshape(n, 2, 4, 6)
  )
  reduced = sharded.reduce()
  np.testing.assert_array_equal(
    reduced.confusion(), _reference_confusion(pred, gt, k, 255, np.ones(2 * n, bool))
  )


def test_configure_is_idempotent():
  make = semantic.ConfusionMatrix.configure
  assert make(3, class_names=["a", "b", "c"]) is make(3, 255, ("a", "b", "c"))
  assert make(3) is not make(3, ignore_label=0)


def test_unconfigured_metric_raises():
  with pytest.raises(ValueError, match="configure"):
    semantic.ConfusionMatrix.empty()


def test_pure_functions_import_without_clu():
  # `sys.modules["clu"] = None` makes any clu import fail, as if clu were not installed.
  code = (
    "import sys; sys.modules['clu'] = None\n"
    "from mpformer_jax.evaluation.semantic import confusion_matrix, semantic_metrics\n"
    "print(semantic_metrics(confusion_matrix([[[0, 1]]], [[[0, 1]]], 2))['mIoU'])"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "100.0"
