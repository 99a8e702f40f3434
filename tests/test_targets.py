"""Compact ground truth: point-sampled and area-pooled masks equal the dense PyTorch operations."""

from __future__ import annotations

import jax
import numpy as np
import torch
import torch.nn.functional as F

from mpformer_jax.targets import area_pooled_masks, sample_masks
from tests.helpers import random_targets


def _dense_masks(targets):
  """`[B, M, H, W]` float masks, the representation the reference uses."""
  seg, ids, valid = (np.asarray(x) for x in (targets.segment_ids, targets.ids, targets.valid))
  return ((seg[:, None] == ids[:, :, None, None]) & valid[:, :, None, None]).astype(np.float32)


def test_sample_masks_equals_grid_sample_of_dense_masks():
  targets = random_targets(0, batch=2, size=(24, 40), max_gt=5, num_classes=3)
  rng = np.random.default_rng(1)
  shared = rng.uniform(-0.05, 1.05, (2, 200, 2)).astype(np.float32)
  per_slot = rng.uniform(0, 1, (2, 5, 60, 2)).astype(np.float32)
  dense = torch.from_numpy(_dense_masks(targets))
  # detectron2 point_sample: grid_sample(mask[:, None], 2 * p - 1, align_corners=False)
  ref_shared = F.grid_sample(
    dense.reshape(-1, 1, 24, 40),
    torch.from_numpy(2 * shared - 1)[:, None].repeat_interleave(5, 0),
    mode="bilinear",
    padding_mode="zeros",
    align_corners=False,
  ).reshape(2, 5, 200)
  ref_slot = F.grid_sample(
    dense.reshape(-1, 1, 24, 40),
    torch.from_numpy(2 * per_slot - 1).reshape(10, 1, 60, 2),
    mode="bilinear",
    padding_mode="zeros",
    align_corners=False,
  ).reshape(2, 5, 60)
  ours_shared = jax.jit(sample_masks)(targets, shared)
  ours_slot = jax.jit(sample_masks)(targets, per_slot)
  np.testing.assert_allclose(ours_shared, ref_shared.numpy(), atol=1e-6)
  np.testing.assert_allclose(ours_slot, ref_slot.numpy(), atol=1e-6)
  # Fractional values at boundaries, i.e. the sampling really is bilinear.
  assert np.any((ref_shared.numpy() > 0.01) & (ref_shared.numpy() < 0.99))


def test_area_pooled_masks_equal_area_interpolation():
  targets = random_targets(2, batch=3, size=(64, 96), max_gt=6, num_classes=4)
  sizes = ((2, 3), (4, 6), (8, 12))
  ours = jax.jit(area_pooled_masks, static_argnums=1)(targets, sizes)
  dense = torch.from_numpy(_dense_masks(targets))
  for size, got in zip(sizes, ours, strict=True):
    ref = F.interpolate(dense, size=size, mode="area") > 1e-8  # the reference's rule
    np.testing.assert_array_equal(np.asarray(got), ref.numpy())
    # "Any pixel", not a majority: some attendable cells are mostly background.
    frac = F.interpolate(dense, size=size, mode="area").numpy()
    assert np.any(np.asarray(got) & (frac < 0.5))
