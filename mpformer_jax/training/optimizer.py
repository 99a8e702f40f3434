"""The reference's optimiser: AdamW with per-parameter groups, full-model clipping, LR schedules.

Spec section 3 ("Optimizer and AMP"), from detectron2's `build_optimizer` in Mask2Former's
`train_net.py`:

- AdamW (betas 0.9/0.999, eps 1e-8), lr 1e-4, weight decay 0.05;
- every parameter under the backbone trains with lr x 0.1 (`backbone_multiplier`);
- no weight decay on normalisation parameters, on `nn.Embed` tables (query features, query
  positions, decoder level embedding, MP-Former's label embedding) and on Swin's relative
  position bias tables; biases and the pixel decoder's raw `level_embed` keep it;
- the gradient of the whole model is clipped to L2 norm 0.01 before the update;
- "poly" (power 0.9, detectron2's WarmupPolyLR) or "step" (x0.1 at given steps) schedules,
  with an optional linear warmup.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

BACKBONE, OTHER = "backbone", "other"
NO_DECAY_LEAVES = ("embedding", "relative_position_bias_table", "absolute_pos_embed")


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_backbone(path) -> bool:
  """Parameters under the top-level `backbone` module."""
  return _names(path)[0] == BACKBONE


def has_weight_decay(path) -> bool:
  """False for normalisation parameters, embedding tables and Swin's position bias tables."""
  names = _names(path)
  if names[-1] in NO_DECAY_LEAVES:
    return False
  # Flax names every norm layer of this code base `*norm*` (LayerNorm, GroupNorm, BatchNorm).
  return not any("norm" in name for name in names[:-1])


def learning_rate_schedule(config: Any, total_steps: int) -> optax.Schedule:
  """The base learning rate at every step (before the backbone multiplier).

  Args:
    config: `config.optimizer` with `learning_rate`, `schedule` ("poly", "step" or "constant"),
      `poly_power`, `decay_steps` (for "step"), `decay_factor`, `warmup_steps`, `warmup_factor`.
    total_steps: training length (the poly schedule reaches 0 there).
  """
  base = config.learning_rate
  if config.schedule == "poly":
    main = optax.polynomial_schedule(base, 0.0, config.poly_power, total_steps)
  elif config.schedule == "step":
    boundaries = {int(s): config.decay_factor for s in config.decay_steps}
    main = optax.piecewise_constant_schedule(base, boundaries)
  elif config.schedule == "constant":
    main = optax.constant_schedule(base)
  else:
    raise ValueError(
      f"optimizer.schedule: expected 'poly', 'step' or 'constant', got {config.schedule!r}"
    )
  if not config.warmup_steps:
    return main
  warmup_steps = int(config.warmup_steps)
  factor = float(config.warmup_factor)

  # detectron2's linear warmup multiplies the main schedule (it does not replace it).
  def schedule(step):
    alpha = jnp.minimum(step / warmup_steps, 1.0)
    return main(step) * (factor * (1.0 - alpha) + alpha)

  return schedule


def create_optimizer(config: Any, total_steps: int, params: Any) -> optax.GradientTransformation:
  """AdamW with the reference's parameter groups and full-model gradient clipping.

  Args:
    config: `config.optimizer` (see `learning_rate_schedule`, plus `weight_decay`, `b1`, `b2`,
      `eps`, `backbone_multiplier`, `clip_norm`: 0 disables clipping).
    total_steps: training length.
    params: the parameter tree (or its shapes), to label the groups.
  """
  schedule = learning_rate_schedule(config, total_steps)
  decay_mask = jax.tree_util.tree_map_with_path(lambda p, _: has_weight_decay(p), params)

  def adamw(multiplier: float) -> optax.GradientTransformation:
    return optax.adamw(
      lambda step: multiplier * schedule(step),
      b1=config.b1,
      b2=config.b2,
      eps=config.eps,
      weight_decay=config.weight_decay,
      mask=decay_mask,
    )

  labels = jax.tree_util.tree_map_with_path(
    lambda p, _: BACKBONE if is_backbone(p) else OTHER, params
  )
  groups = optax.multi_transform(
    {BACKBONE: adamw(config.backbone_multiplier), OTHER: adamw(1.0)}, labels
  )
  if config.clip_norm:
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), groups)
  return groups
