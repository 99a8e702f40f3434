"""MP-Former's mask-pilot block: GT attention masks, noise, self-attention mask, padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpformer_jax import models
from mpformer_jax.models import mask_pilot as mp
from mpformer_jax.targets import Targets
from tests.helpers import random_targets, random_variables, tiny_model_config


def _pilot(targets, **kwargs):
  module = mp.MaskPilot(num_classes=5, hidden_dim=8, num_queries=3, num_layers=6, **kwargs)
  sizes = ((2, 2), (4, 4), (8, 8))
  variables = module.init(
    {
      "params": jax.random.PRNGKey(0),
      "label_noise": jax.random.PRNGKey(1),
      "mask_noise": jax.random.PRNGKey(2),
    },
    targets,
    sizes,
  )
  out = module.apply(
    variables,
    targets,
    sizes,
    rngs={"label_noise": jax.random.PRNGKey(3), "mask_noise": jax.random.PRNGKey(4)},
  )
  return module, variables, out


def test_queries_masks_and_layer_schedule():
  targets = random_targets(0, batch=4, size=(32, 32), max_gt=4, num_classes=5, counts=[3, 1, 2, 0])
  _, variables, out = _pilot(targets, label_noise_ratio=0.0, all_layers=False, group_size=2)
  table = variables["params"]["label_enc"]["embedding"]
  assert table.shape == (5, 8)  # K rows, no "no object"
  valid = np.asarray(targets.valid)
  q = np.asarray(out.queries)
  np.testing.assert_allclose(q[valid], np.asarray(table)[np.asarray(targets.labels)[valid]])
  assert np.all(q[~valid] == 0)  # empty slots have zero content
  # GT masks in layers 0..3 only (all_layers=False), at the level of each layer.
  assert [a is None for a in out.attn_masks] == [False] * 4 + [True] * 2
  assert [a.shape[-1] for a in out.attn_masks[:4]] == [4, 16, 64, 4]
  # Empty slots are fully blocked, so the decoder lets them attend everywhere.
  blocked = np.asarray(out.attn_masks[2])
  assert np.all(blocked[~valid])


def test_label_noise_rate():
  targets = random_targets(
    1, batch=4, size=(32, 32), max_gt=50, num_classes=5, counts=[50, 50, 50, 50]
  )
  targets = targets.replace(labels=np.zeros_like(targets.labels))
  module = mp.MaskPilot(
    num_classes=5, hidden_dim=4, num_queries=3, num_layers=1, label_noise_ratio=0.4
  )
  sizes = ((4, 4),)
  v = module.init(
    {"params": jax.random.PRNGKey(0), "label_noise": jax.random.PRNGKey(0)}, targets, sizes
  )
  table = np.asarray(v["params"]["label_enc"]["embedding"])
  changed = 0
  for seed in range(20):
    out = module.apply(v, targets, sizes, rngs={"label_noise": jax.random.PRNGKey(seed)})
    q = np.asarray(out.queries)[np.asarray(targets.valid)]
    changed += np.sum(np.any(q != table[0], axis=-1))
  # A flip draws a uniform class, which is still class 0 one time in five: rate 0.4 * 4/5.
  rate = changed / (20 * np.asarray(targets.valid).sum())
  assert abs(rate - 0.32) < 0.03, rate


def test_point_noise_statistics():
  from mpformer_jax.ops.rng import slot_keys

  rng = np.random.default_rng(0)
  # Rows with 2..60 attendable cells of 64.
  blocked = rng.uniform(size=(1, 200, 64)) < rng.uniform(0.05, 0.97, (1, 200, 1))
  attendable = (~blocked).sum(-1)[0]
  scale = 0.2
  flips = []
  for seed in range(100):
    keys = slot_keys(jax.random.PRNGKey(seed), 1, 1, 200)
    noised = mp.point_noise(keys, jnp.asarray(blocked), scale)
    flips.append((np.asarray(noised) != blocked).sum(-1)[0])
  mean_flips = np.mean(flips, axis=0)
  # Expected flips per row = noise_scale * attendable cells.
  np.testing.assert_allclose(mean_flips.mean(), scale * attendable.mean(), rtol=0.05)
  slope = np.polyfit(attendable, mean_flips, 1)[0]
  np.testing.assert_allclose(slope, scale, rtol=0.1)
  keys = slot_keys(jax.random.PRNGKey(0), 1, 1, 200)
  assert np.array_equal(np.asarray(mp.point_noise(keys, blocked, 0.0)), blocked)


def test_noise_is_fresh_per_layer_and_group():
  targets = random_targets(2, batch=2, size=(32, 32), max_gt=3, num_classes=5, counts=[3, 3])
  _, _, out = _pilot(targets, noise_scale=0.5, groups=2, group_size=2)
  a0, a3 = np.asarray(out.attn_masks[0]), np.asarray(out.attn_masks[3])  # same level
  assert not np.array_equal(a0, a3)
  assert not np.array_equal(a0[:, :3], a0[:, 3:])  # the two groups differ
  _, _, clean = _pilot(targets, noise_scale=0.0, groups=2, group_size=2)
  c0 = np.asarray(clean.attn_masks[0])
  assert np.array_equal(c0[:, :3], c0[:, 3:]) and np.array_equal(
    c0, np.asarray(clean.attn_masks[3])
  )


def test_self_attention_mask_structure():
  slot_used = np.array([[True, True, False], [True, False, False]])
  mask = np.asarray(mp.self_attention_mask(groups=2, max_gt=3, num_queries=4, slot_used=slot_used))
  assert mask.shape == (2, 10, 10)
  m0 = mask[0]
  assert np.all(m0[6:, :6])  # matching queries never see MP queries
  assert not np.any(m0[:, 6:])  # everyone sees the matching queries
  assert np.all(m0[:3, 3:6]) and np.all(m0[3:6, :3])  # groups do not see each other
  assert not np.any(m0[:3, :2]) and not np.any(m0[3:6, 3:5])  # own group's used slots
  assert np.all(m0[:, 2]) and np.all(m0[:, 5])  # unused slots are invisible
  assert np.all(mask[1][:, [1, 2, 4, 5]]) and not np.any(mask[1][:3, 0])


def test_group_max_count():
  valid = np.zeros((4, 5), bool)
  valid[0, :2] = valid[1, :4] = valid[2, :1] = True
  np.testing.assert_array_equal(mp.group_max_count(valid, 2), [4, 4, 1, 1])
  with pytest.raises(ValueError, match="group size"):
    mp.group_max_count(valid, 3)


def _mp_model(label_noise_ratio=0.2):
  config = tiny_model_config(num_layers=3)
  config.mask_pilot.enabled = True
  config.mask_pilot.label_noise_ratio = label_noise_ratio
  config.mask_pilot.group_size = 2
  config.decoder.query_pos_embed = False
  return config, models.build_model(config)


@pytest.mark.slow  # ~90 s of compiling on 2 cores; kept out of the 30-minute CI
def test_mask_pilot_absent_at_inference_and_gradients_reach_label_embedding():
  config, model = _mp_model(label_noise_ratio=0.0)
  variables = random_variables(model, (64, 64))
  assert "label_enc" in variables["params"]["mask_pilot"]
  images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
  targets = random_targets(3, batch=2, size=(64, 64), max_gt=4, num_classes=5)
  rngs = {"label_noise": jax.random.PRNGKey(0), "mask_noise": jax.random.PRNGKey(1)}
  infer = model.apply(variables, images, train=False, targets=targets)
  assert "mask_pilot" not in infer
  # The same network without the mask-pilot module predicts exactly the same at inference.
  config.mask_pilot.enabled = False
  plain = models.build_model(config).apply(
    {
      "params": {k: v for k, v in variables["params"].items() if k != "mask_pilot"},
      "batch_stats": variables["batch_stats"],
    },
    images,
  )
  np.testing.assert_array_equal(infer["pred_logits"], plain["pred_logits"])

  def mp_loss(params):
    out = model.apply(
      {**variables, "params": params}, images, train=True, targets=targets, rngs=rngs
    )
    assert out["mask_pilot"]["pred_logits"].shape == (2, 4, 6)
    return jnp.sum(out["mask_pilot"]["pred_logits"] ** 2)

  grads = jax.grad(mp_loss)(variables["params"])
  g = np.asarray(grads["mask_pilot"]["label_enc"]["embedding"])
  used = np.unique(np.asarray(targets.labels)[np.asarray(targets.valid)])
  assert np.all(np.abs(g[used]).sum(-1) > 0)
  unused = np.setdiff1d(np.arange(5), used)
  assert np.all(g[unused] == 0)


def test_padding_does_not_change_real_slots():
  """max_gt 4 vs 7: identical loss and gradients (the extra slots are invisible and unused)."""
  from mpformer_jax.losses.criterion import LossConfig
  from mpformer_jax.training.objective import make_loss_fn

  config, model = _mp_model()
  config.mask_pilot.noise_scale = 0.3  # exercise the per-slot mask noise too
  model = models.build_model(config)
  variables = random_variables(model, (64, 64), seed=1)
  images = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
  small = random_targets(4, batch=2, size=(64, 64), max_gt=4, num_classes=5, counts=[3, 2])
  pad = lambda x, v: np.concatenate([np.asarray(x), np.full((2, 3), v, np.asarray(x).dtype)], 1)
  big = Targets(
    segment_ids=small.segment_ids,
    ids=pad(small.ids, 0),
    labels=pad(small.labels, 0),
    valid=pad(small.valid, False),
  )
  cfg = LossConfig(num_points=64, group_size=2)
  loss_fn = jax.jit(jax.grad(make_loss_fn(model, cfg), has_aux=True))
  state = {"batch_stats": variables["batch_stats"]}
  rng = jax.random.PRNGKey(7)
  (g_small, (t_small, _)) = loss_fn(variables["params"], state, images, small, rng)
  (g_big, (t_big, _)) = loss_fn(variables["params"], state, images, big, rng)
  for key in t_small:
    np.testing.assert_allclose(t_small[key], t_big[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # Same gradients up to float rounding (summation order differs with the block size); the
  # absolute tolerance is relative to the largest gradient, for parameters whose gradient is
  # zero in exact arithmetic (a conv bias before GroupNorm) and only rounding noise here.
  overall = max(float(np.abs(x).max()) for x in jax.tree.leaves(g_big))
  jax.tree_util.tree_map_with_path(
    lambda path, a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5 * overall, err_msg=jax.tree_util.keystr(path)
    ),
    g_small,
    g_big,
  )
  # ...and the real slots do matter: dropping a segment changes the gradients.
  fewer = big.replace(valid=np.asarray(big.valid) & (np.arange(7) != 0))
  (g_fewer, _) = loss_fn(variables["params"], state, images, fewer, rng)
  diff = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), g_big, g_fewer))
  assert max(diff) > 1e-3
