"""The optimiser against PyTorch's AdamW with detectron2's parameter groups, and the schedules."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from mpformer_jax import config_lib, models
from mpformer_jax.training import optimizer


def _param_shapes(config):
  model = models.build_model(config)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)["params"]


def _groups(params):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {
    jax.tree_util.keystr(p): (optimizer.is_backbone(p), optimizer.has_weight_decay(p))
    for p, _ in flat
  }


def test_parameter_groups_follow_the_reference():
  groups = _groups(_param_shapes(config_lib.mp_former_config(10)))
  assert groups["['backbone']['stem_conv']['kernel']"] == (True, True)
  assert groups["['mask_pilot']['label_enc']['embedding']"] == (False, False)
  assert groups["['transformer_decoder']['query_feat']['embedding']"] == (False, False)
  assert groups["['transformer_decoder']['level_embed']['embedding']"] == (False, False)
  # The pixel decoder's level embedding is a raw parameter in the reference: it keeps decay.
  assert groups["['pixel_decoder']['level_embed']"] == (False, True)
  assert groups["['transformer_decoder']['layer_0']['self_attn_norm']['scale']"] == (False, False)
  assert groups["['pixel_decoder']['input_proj_0']['norm']['bias']"] == (False, False)
  assert groups["['transformer_decoder']['heads']['class_embed']['bias']"] == (False, True)

  swin = _groups(_param_shapes(config_lib.model_config(10, "swin_tiny")))
  table = "['backbone']['layers_0']['blocks_0']['attn']['relative_position_bias_table']"
  assert swin[table] == (True, False)
  assert swin["['backbone']['layers_0']['blocks_0']['norm1']['scale']"] == (True, False)
  assert swin["['backbone']['layers_0']['blocks_0']['attn']['qkv']['kernel']"] == (True, True)


def test_update_matches_torch_adamw_with_groups_and_full_model_clipping():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  params = {
    "backbone": {"conv": {"kernel": rng.standard_normal((3, 4)).astype(np.float32)}},
    "decoder": {
      "norm": {"scale": rng.standard_normal((4,)).astype(np.float32)},
      "query_feat": {"embedding": rng.standard_normal((2, 4)).astype(np.float32)},
      "linear": {"kernel": rng.standard_normal((4, 4)).astype(np.float32)},
    },
  }
  cfg = config_lib.optimizer_config()
  cfg.schedule = "constant"
  cfg.learning_rate = 1e-2  # large enough for the decay and the groups to matter
  tx = optimizer.create_optimizer(cfg, 10, params)
  opt_state = tx.init(params)

  tensors = jax.tree.map(lambda x: torch.tensor(x, requires_grad=True), params)
  b, d = tensors["backbone"], tensors["decoder"]
  torch_opt = torch.optim.AdamW(
    [
      {"params": [b["conv"]["kernel"]], "lr": 1e-3, "weight_decay": 0.05},
      {"params": [d["norm"]["scale"], d["query_feat"]["embedding"]], "weight_decay": 0.0},
      {"params": [d["linear"]["kernel"]], "weight_decay": 0.05},
    ],
    lr=1e-2,
    betas=(0.9, 0.999),
    eps=1e-8,
  )
  for _ in range(3):
    grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    for t, g in zip(jax.tree.leaves(tensors), jax.tree.leaves(grads), strict=True):
      t.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_norm_(jax.tree.leaves(tensors), 0.01)
    torch_opt.step()
  for ours, ref in zip(jax.tree.leaves(params), jax.tree.leaves(tensors), strict=True):
    np.testing.assert_allclose(ours, ref.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_schedules_follow_detectron2():
  cfg = config_lib.optimizer_config()
  poly = optimizer.learning_rate_schedule(cfg, 1000)
  for step in (0, 1, 500, 999, 1000):
    expected = 1e-4 * (1 - step / 1000) ** 0.9
    np.testing.assert_allclose(poly(step), expected, rtol=1e-5, atol=1e-12)

  cfg.schedule, cfg.decay_steps = "step", (100, 150)
  cfg.warmup_steps, cfg.warmup_factor = 10, 0.001
  step = optimizer.learning_rate_schedule(cfg, 200)
  # detectron2: factor * (1 - alpha) + alpha with alpha = iter / warmup_iters, times the rate.
  np.testing.assert_allclose(step(0), 1e-4 * 0.001, rtol=1e-5)
  np.testing.assert_allclose(step(5), 1e-4 * (0.001 * 0.5 + 0.5), rtol=1e-5)
  np.testing.assert_allclose(step(99), 1e-4, rtol=1e-5)
  np.testing.assert_allclose(step(100), 1e-5, rtol=1e-5)
  np.testing.assert_allclose(step(150), 1e-6, rtol=1e-5)

  cfg.schedule = "cosine"
  with pytest.raises(ValueError, match="optimizer.schedule"):
    optimizer.learning_rate_schedule(cfg, 10)
