"""Cutting a batch's ground-truth slots to a bucket (`training.slot_buckets`)."""

from __future__ import annotations

import numpy as np
import pytest

from mpformer_jax.training import slot_buckets


def _batch(counts, max_gt=8):
  valid = np.arange(max_gt)[None, :] < np.asarray(counts)[:, None]
  return {
    "image": np.zeros((len(counts), 4, 4, 3), np.float32),
    "segment_ids": np.zeros((len(counts), 4, 4), np.int32),
    "ids": np.where(valid, np.arange(1, max_gt + 1), 0).astype(np.int32),
    "labels": np.where(valid, 3, 0).astype(np.int32),
    "valid": valid,
  }


def test_bucket_sizes_keep_the_buckets_below_max_gt_and_add_it():
  assert slot_buckets.bucket_sizes((64, 32), 128) == (32, 64, 128)
  assert slot_buckets.bucket_sizes((32, 64), 19) == (19,)
  assert slot_buckets.bucket_sizes((), 16) == (16,)
  for bad in ((0,), (-4,), (2.5,), (True,)):
    with pytest.raises(ValueError, match="training.gt_slot_buckets"):
      slot_buckets.bucket_sizes(bad, 16)


def test_choose_bucket_takes_the_smallest_that_holds_the_largest_count():
  sizes = (4, 8, 16)
  assert [slot_buckets.choose_bucket(n, sizes) for n in (0, 4, 5, 8, 9, 16)] == [4, 4, 8, 8, 16, 16]
  with pytest.raises(ValueError, match="17 segments"):
    slot_buckets.choose_bucket(17, sizes)


def test_cut_slots_keeps_every_segment_and_the_other_arrays():
  batch = _batch([3, 0, 5])
  assert slot_buckets.largest_count(batch["valid"]) == 5
  cut = slot_buckets.cut_slots(batch, 5)
  for key in slot_buckets.SLOT_KEYS:
    assert cut[key].shape == (3, 5)
    np.testing.assert_array_equal(cut[key], batch[key][:, :5])
  assert cut["valid"].sum() == batch["valid"].sum()
  assert cut["image"] is batch["image"] and cut["segment_ids"] is batch["segment_ids"]


def test_cut_slots_refuses_to_lose_ground_truth():
  with pytest.raises(ValueError, match="5 segments do not fit in 4 slots"):
    slot_buckets.cut_slots(_batch([3, 5]), 4)
  holes = _batch([3, 2])
  holes["valid"][1, 0] = False  # a valid slot after an invalid one
  with pytest.raises(ValueError, match="must come first"):
    slot_buckets.cut_slots(holes, 8)
