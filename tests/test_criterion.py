"""The objective: each term vs numpy, and the matching part vs Hugging Face's Mask2FormerLoss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpformer_jax.losses import criterion
from mpformer_jax.losses.matcher import CostWeights
from mpformer_jax.losses.points import point_counts, prefix_counts, smallest_k_indices
from mpformer_jax.ops import rng as rng_lib
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


def test_prefix_counts_equal_cumsum():
  mask = np.random.default_rng(0).random((3, 300)) < 0.4  # 300: not a power of two
  mask[1] = True
  got = np.asarray(prefix_counts(mask))
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


def _bilinear(img, pts):  # grid_sample(align_corners=False, zeros)
  t = torch.from_numpy(img)[None, None]
  g = torch.from_numpy(2 * pts - 1)[None, :, None]
  return F.grid_sample(t, g, align_corners=False)[0, 0, :, 0].numpy()


def _numpy_mask_losses(maps, targets, valid, over, rand, unc_n):
  """Sums over valid pairs (row `n` <-> GT slot `n % M`) of the reference's BCE and dice."""
  m = targets.max_gt
  seg, ids = np.asarray(targets.segment_ids), np.asarray(targets.ids)
  want_bce = want_dice = 0.0
  for b in range(maps.shape[0]):
    for n in range(maps.shape[1]):
      if not valid[b, n]:
        continue
      unc = -np.abs(_bilinear(maps[b, n], over[b, n]))
      keep = over[b, n][np.argsort(-unc, kind="stable")[:unc_n]]
      pts = np.concatenate([keep, rand[b, n]])
      x = _bilinear(maps[b, n], pts)
      t = _bilinear((seg[b] == ids[b, n % m]).astype(np.float32), pts)
      s = 1 / (1 + np.exp(-x))
      want_bce += np.mean(-(t * np.log(s) + (1 - t) * np.log(1 - s)))
      want_dice += 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
  return want_bce, want_dice


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
  want_bce, want_dice = _numpy_mask_losses(maps, targets, valid, over, rand, unc_n)
  np.testing.assert_allclose(bce, want_bce, rtol=1e-5)
  np.testing.assert_allclose(dice, want_dice, rtol=1e-5)


@pytest.mark.parametrize("pair_chunk", [1, 2, 5, 64])
def test_pooled_mask_losses_follow_each_terms_valid_pairs(pair_chunk):
  # Three terms (two of M pairs, one of 2 M like an MP block), invalid pairs scattered among
  # valid ones (on valid GT slots) and a term without any: every chunk size gives each
  # term's numpy sums.
  targets = random_targets(4, batch=2, size=(16, 16), max_gt=3, num_classes=3, counts=[3, 2])
  cfg = criterion.LossConfig(
    num_points=20, oversample_ratio=2.0, importance_sample_ratio=0.5, pair_chunk=pair_chunk
  )
  over_n, unc_n, rand_n = point_counts(20, 2.0, 0.5)
  rng = np.random.default_rng(pair_chunk)
  valids = [
    np.array([[True, False, True], [False, True, False]]),
    np.zeros((2, 3), bool),
    np.array([[True, True, False, False, True, True], [True, False, False, True, False, False]]),
  ]
  terms, wants = [], []
  for valid in valids:
    n = valid.shape[1]
    maps = rng.standard_normal((2, n, 4, 4)).astype(np.float32) * 3
    maps[~valid] = np.nan  # padding must not leak into the sums
    over = rng.uniform(size=(2, n, over_n, 2)).astype(np.float32)
    rand = rng.uniform(size=(2, n, rand_n, 2)).astype(np.float32)
    terms.append(criterion.PairTerm(maps, valid, None, (over, rand)))
    wants.append(_numpy_mask_losses(maps, targets, valid, over, rand, unc_n))
  bce, dice = jax.jit(lambda t: criterion.pooled_mask_losses(t, targets, cfg))(terms)
  np.testing.assert_allclose(bce, [w[0] for w in wants], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dice, [w[1] for w in wants], rtol=1e-5, atol=1e-6)


def test_pooled_mask_losses_refuse_terms_that_mix_points_and_keys():
  targets = random_targets(6, batch=1, size=(8, 8), max_gt=2, num_classes=2, counts=[2])
  maps = np.zeros((1, 2, 4, 4), np.float32)
  valid = np.ones((1, 2), bool)
  over, rand = np.zeros((1, 2, 4, 2), np.float32), np.zeros((1, 2, 2, 2), np.float32)
  terms = [
    criterion.PairTerm(maps, valid, None, (over, rand)),
    criterion.PairTerm(maps, valid, rng_lib.slot_keys(jax.random.key(0), 1, 1, 2)),
  ]
  cfg = criterion.LossConfig(num_points=4, oversample_ratio=1.0)
  with pytest.raises(ValueError, match="mix given"):
    criterion.pooled_mask_losses(terms, targets, cfg)


def test_pooled_mask_losses_draw_each_pairs_points_from_its_own_key():
  # With keys, a pair's points do not depend on the chunking or on the other pairs: chunks of
  # 1 and of all pairs agree, and so do the value and gradient of a term computed alone.
  targets = random_targets(5, batch=2, size=(16, 16), max_gt=4, num_classes=3, counts=[4, 2])
  rng = np.random.default_rng(0)
  maps = [rng.standard_normal((2, 4, 4, 4)).astype(np.float32) * 3 for _ in range(2)]
  valid = np.asarray(targets.valid)
  keys = [rng_lib.slot_keys(jax.random.key(i), 2, 1, 4) for i in range(2)]

  def losses(maps, chunk, which=(0, 1)):
    cfg = criterion.LossConfig(num_points=30, pair_chunk=chunk)
    terms = [criterion.PairTerm(maps[i], valid, keys[i]) for i in which]
    bce, dice = criterion.pooled_mask_losses(terms, targets, cfg)
    weight = jnp.arange(1, len(which) + 1)  # term i counts i + 1 times
    return jnp.sum(bce * weight) + jnp.sum(dice * weight), (bce, dice)

  grad = jax.jit(jax.grad(losses, has_aux=True), static_argnums=(1, 2))
  (g1, (b1, d1)), (g8, (b8, d8)) = grad(maps, 1), grad(maps, 8)
  np.testing.assert_allclose(b1, b8, rtol=1e-6)
  np.testing.assert_allclose(d1, d8, rtol=1e-6)
  for a, b in zip(g1, g8, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  (g_alone, (b_alone, d_alone)) = grad(maps, 3, (1,))
  np.testing.assert_allclose(b_alone[0], b8[1], rtol=1e-6)
  np.testing.assert_allclose(d_alone[0], d8[1], rtol=1e-6)
  np.testing.assert_allclose(g_alone[1], g8[1] / 2, rtol=1e-5, atol=1e-8)
  assert np.abs(g8[1][valid]).sum() > 0 and np.all(g8[1][~valid] == 0)


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
