"""The objective: each term vs numpy, and the matching part vs Hugging Face's Mask2FormerLoss."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpformer_jax.losses import criterion
from mpformer_jax.losses.matcher import CostWeights
from mpformer_jax.losses.points import point_counts, prefix_counts, smallest_k_indices
from tests.helpers import random_targets


def test_weighted_cross_entropy_equals_numpy_per_group():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((4, 5, 4)).astype(np.float32)
  target = rng.integers(0, 4, (4, 5))
  include = rng.uniform(size=(4, 5)) < 0.8
  got = criterion.weighted_cross_entropy(logits, target, include, 0.1, groups=2)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, target[..., None], -1)[..., 0]
  w = np.where(target == 3, 0.1, 1.0) * include
  per_group = [
    (w[g * 2 : g * 2 + 2] * nll[g * 2 : g * 2 + 2]).sum() / w[g * 2 : g * 2 + 2].sum()
    for g in range(2)
  ]
  np.testing.assert_allclose(got, np.mean(per_group), rtol=1e-6)
  # Single group == torch's weighted mean.
  ref = F.cross_entropy(
    torch.from_numpy(logits).permute(0, 2, 1),
    torch.from_numpy(target),
    weight=torch.tensor([1.0, 1.0, 1.0, 0.1]),
  )
  np.testing.assert_allclose(
    criterion.weighted_cross_entropy(logits, target, np.ones_like(include), 0.1, 1),
    ref.item(),
    rtol=1e-6,
  )


@pytest.mark.parametrize("k", [1, 7, 48, 64])
def test_smallest_k_indices_is_the_top_k_set_with_ties_to_the_lower_position(k):
  rng = np.random.default_rng(k)
  values = np.abs(rng.standard_normal((6, 64))).astype(np.float32)
  values[1] = 0.5  # a row of ties
  values[2, ::3] = 0.0  # zeros among others
  values[3, :40] = values[3, 0]  # ties straddling the k-th value
  values[4] = rng.integers(0, 4, 64).astype(np.float32)  # a few distinct values, many ties
  values[5, 10] = np.inf
  got = np.asarray(smallest_k_indices(values, k))
  assert got.shape == (6, k) and got.dtype == np.int32
  want = np.sort(np.argsort(values, axis=1, kind="stable")[:, :k], axis=1)
  np.testing.assert_array_equal(got, want)
  _, top = jax.lax.top_k(-values, k)
  np.testing.assert_array_equal(got, np.sort(np.asarray(top), axis=1))


@pytest.mark.parametrize("k", [1, 97, 300])
def test_smallest_k_indices_without_ties_takes_the_no_tie_branch(k):
  # Distinct values in every row: `smallest_k_indices` skips the tie ranking (a `lax.cond`).
  values = np.random.default_rng(k).permutation(4 * 300).reshape(4, 300).astype(np.float32)
  got = np.asarray(smallest_k_indices(values, k))
  want = np.sort(np.argsort(values, axis=1)[:, :k], axis=1)
  np.testing.assert_array_equal(got, want)


def test_prefix_counts_equal_cumsum_across_blocks():
  mask = np.random.default_rng(0).random((3, 300)) < 0.4  # 300: two full blocks and a partial
  mask[1] = True
  got = np.asarray(prefix_counts(mask, block=128))
  np.testing.assert_array_equal(got, np.cumsum(mask, axis=1))
  assert got.dtype == np.int32


@pytest.mark.parametrize("num_points", [10, 40])
def test_matching_costs_agree_whichever_side_is_sampled(num_points):
  # 4 x 4 = 16 mask pixels: 10 points sample the features first, 40 points the masks first.
  from mpformer_jax.losses.matcher import pairwise_costs

  b, q, c, k, layers = 2, 5, 6, 3, 2
  rng = np.random.default_rng(num_points)
  targets = random_targets(3, batch=b, size=(16, 16), max_gt=3, num_classes=k, counts=[3, 1])
  feats = rng.standard_normal((b, 4, 4, c)).astype(np.float32)
  preds = [
    {
      "mask_embed": rng.standard_normal((b, q, c)).astype(np.float32),
      "pred_logits": rng.standard_normal((b, q, k + 1)).astype(np.float32),
    }
    for _ in range(layers)
  ]
  coords = rng.uniform(size=(layers, b, num_points, 2)).astype(np.float32)
  got = np.asarray(
    criterion.matching_costs(preds, feats, targets, coords, CostWeights())
  )  # [L, B, Q, M]
  for i, pred in enumerate(preds):
    masks = np.einsum("bqc,bhwc->bqhw", pred["mask_embed"], feats)
    grid = torch.from_numpy(2 * coords[i] - 1)[:, :, None]  # [B, P, 1, 2]
    at = F.grid_sample(torch.from_numpy(masks), grid, align_corners=False)[..., 0].numpy()
    gt = criterion.sample_masks(targets, coords[i])
    want = pairwise_costs(pred["pred_logits"], at, targets.labels, gt, targets.valid, CostWeights())
    np.testing.assert_allclose(got[i], np.asarray(want), rtol=1e-5, atol=1e-5)


def test_mask_losses_equal_numpy_with_given_points():
  targets = random_targets(1, batch=2, size=(16, 16), max_gt=3, num_classes=3, counts=[3, 2])
  cfg = criterion.LossConfig(num_points=20, oversample_ratio=2.0, importance_sample_ratio=0.5)
  over_n, unc_n, rand_n = point_counts(20, 2.0, 0.5)
  rng = np.random.default_rng(2)
  maps = rng.standard_normal((2, 3, 4, 4)).astype(np.float32) * 3
  over = rng.uniform(size=(2, 3, over_n, 2)).astype(np.float32)
  rand = rng.uniform(size=(2, 3, rand_n, 2)).astype(np.float32)
  valid = np.asarray(targets.valid)
  bce, dice = criterion.mask_losses(maps, targets, valid, None, cfg, (over, rand))

  def bilinear(img, pts):  # grid_sample(align_corners=False, zeros)
    t = torch.from_numpy(img)[None, None]
    g = torch.from_numpy(2 * pts - 1)[None, :, None]
    return F.grid_sample(t, g, align_corners=False)[0, 0, :, 0].numpy()

  dense = np.asarray(targets.segment_ids)[:, None] == np.asarray(targets.ids)[:, :, None, None]
  want_bce = want_dice = 0.0
  for b in range(2):
    for j in range(3):
      if not valid[b, j]:
        continue
      unc = -np.abs(bilinear(maps[b, j], over[b, j]))
      keep = over[b, j][np.argsort(-unc, kind="stable")[:unc_n]]
      pts = np.concatenate([keep, rand[b, j]])
      x = bilinear(maps[b, j], pts)
      t = bilinear(dense[b, j].astype(np.float32), pts)
      s = 1 / (1 + np.exp(-x))
      want_bce += np.mean(-(t * np.log(s) + (1 - t) * np.log(1 - s)))
      want_dice += 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
  np.testing.assert_allclose(bce, want_bce, rtol=1e-5)
  np.testing.assert_allclose(dice, want_dice, rtol=1e-5)


class _RandQueue:
  """Stands in for `torch.rand`, recording every draw in call order."""

  def __init__(self, seed):
    self.gen = torch.Generator().manual_seed(seed)
    self.rand = torch.rand  # the real one; the test patches the module attribute
    self.draws = []

  def __call__(self, *shape, **kwargs):
    kwargs.pop("device", None)
    out = self.rand(*shape, generator=self.gen, **kwargs)
    self.draws.append(out.clone())
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_matching_losses_equal_hugging_face(seed, monkeypatch):
  from transformers import Mask2FormerConfig
  from transformers.models.mask2former import modeling_mask2former as hf

  b, q, k, c, layers, m = 2, 7, 4, 8, 3, 5
  num_points = 40
  rng = np.random.default_rng(seed)
  targets = random_targets(seed, batch=b, size=(32, 32), max_gt=m, num_classes=k, counts=[4, 2])
  feats = rng.standard_normal((b, 8, 8, c)).astype(np.float32)
  embeds = [rng.standard_normal((b, q, c)).astype(np.float32) for _ in range(layers)]
  logits = [rng.standard_normal((b, q, k + 1)).astype(np.float32) for _ in range(layers)]
  masks = [np.einsum("bqc,bhwc->bqhw", e, feats) for e in embeds]

  # The reference, with torch.rand recorded.
  config = Mask2FormerConfig(
    num_labels=k, train_num_points=num_points, oversample_ratio=3.0, importance_sample_ratio=0.75
  )
  config.num_labels = k
  loss_module = hf.Mask2FormerLoss(
    config, {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
  )
  queue = _RandQueue(seed)
  monkeypatch.setattr(hf.torch, "rand", queue)
  recorded = []

  class RecordingMatcher(torch.nn.Module):
    def __init__(self, inner):
      super().__init__()
      self.inner = inner

    def forward(self, *args):
      recorded.append(self.inner(*args))
      return recorded[-1]

  loss_module.matcher = RecordingMatcher(loss_module.matcher)
  valid = np.asarray(targets.valid)
  dense = np.asarray(targets.segment_ids)[:, None] == np.asarray(targets.ids)[:, :, None, None]
  mask_labels = [torch.from_numpy(dense[i][valid[i]].astype(np.float32)) for i in range(b)]
  class_labels = [
    torch.from_numpy(np.asarray(targets.labels)[i][valid[i]]).long() for i in range(b)
  ]
  aux = [
    {
      "masks_queries_logits": torch.from_numpy(masks[i]),
      "class_queries_logits": torch.from_numpy(logits[i]),
    }
    for i in range(layers - 1)
  ]
  ref = loss_module(
    torch.from_numpy(masks[-1]), torch.from_numpy(logits[-1]), mask_labels, class_labels, aux
  )
  monkeypatch.undo()

  # Re-derive which draw belongs to which prediction, image and pair. Hugging Face handles the
  # final prediction first, then the earlier ones; per prediction: one draw per image for the
  # matcher, then (oversampled, random) over its matched pairs sorted by image and query.
  over_n, _, rand_n = point_counts(num_points, 3.0, 0.75)
  draws = iter(queue.draws)
  order = [layers - 1, *range(layers - 1)]
  matcher_points = np.zeros((layers, b, num_points, 2), np.float32)
  loss_points = [None] * layers
  for layer, indices in zip(order, recorded, strict=True):
    for i in range(b):
      matcher_points[layer, i] = next(draws)[0].numpy()
    over, rand = next(draws).numpy(), next(draws).numpy()
    lo = np.zeros((b, m, over_n, 2), np.float32)
    lr = np.zeros((b, m, rand_n, 2), np.float32)
    pair = 0
    for i, (_, tgt) in enumerate(indices):
      slots = np.flatnonzero(valid[i])
      for j in tgt.numpy():
        lo[i, slots[j]], lr[i, slots[j]] = over[pair], rand[pair]
        pair += 1
    loss_points[layer] = (lo, lr)
  assert next(draws, None) is None  # every draw accounted for

  outputs = {"mask_features": feats, "aux_outputs": []}
  for layer in range(layers):
    pred = {"pred_logits": logits[layer], "mask_embed": embeds[layer]}
    if layer == layers - 1:
      outputs.update(pred)
    else:
      outputs["aux_outputs"].append(pred)
  cfg = criterion.LossConfig(
    num_points=num_points, group_size=b, matcher_weights=CostWeights(class_weight=1.0)
  )
  _, terms = criterion.set_criterion(
    outputs,
    targets,
    jax.random.PRNGKey(0),
    cfg,
    controlled={"matcher_points": matcher_points, "loss_points": loss_points},
  )
  for layer in range(layers):
    suffix = "" if layer == layers - 1 else f"_{layer}"
    np.testing.assert_allclose(
      terms[f"loss_ce{suffix}"], 2.0 * ref[f"loss_cross_entropy{suffix}"], rtol=1e-5
    )
    np.testing.assert_allclose(
      terms[f"loss_mask{suffix}"], 5.0 * ref[f"loss_mask{suffix}"], rtol=1e-4
    )
    np.testing.assert_allclose(
      terms[f"loss_dice{suffix}"], 5.0 * ref[f"loss_dice{suffix}"], rtol=1e-4
    )
