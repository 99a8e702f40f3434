"""Point sampling for the mask losses (PointRend-style, detectron2 `point_features.py`).

Mask2Former never compares full masks: the matcher uses uniform random points, and the losses use
points concentrated where the prediction is uncertain (`|logit|` small) plus some uniform ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpformer_jax.ops.sampling import point_sample


def sample_maps(maps: jax.Array, coords: jax.Array) -> jax.Array:
  """Bilinear samples of single-channel maps at per-map points.

  Args:
    maps: `[N, h, w]` (e.g. mask logits of matched predictions).
    coords: `[N, P, 2]` normalised (x, y).

  Returns:
    `[N, P]`, `point_sample` semantics (zero padding, align_corners=False).
  """
  return point_sample(maps[..., None], coords)[..., 0]


def uncertain_points(
  logit_maps: jax.Array,
  oversampled: jax.Array,
  random: jax.Array,
  num_uncertain: int,
) -> jax.Array:
  """detectron2's `get_uncertain_point_coords_with_randomness`, with the randomness given.

  Keeps the `num_uncertain` most uncertain (smallest |logit|) of the `oversampled` points and
  appends the `random` ones. No gradient flows through the choice.

  Args:
    logit_maps: `[N, h, w]` mask logits.
    oversampled: `[N, S, 2]` uniform points (S = oversample_ratio * num_points).
    random: `[N, R, 2]` uniform points (R = num_points - num_uncertain).
    num_uncertain: points kept by uncertainty.

  Returns:
    `[N, num_uncertain + R, 2]`.
  """
  logits = sample_maps(jax.lax.stop_gradient(logit_maps), oversampled)
  _, idx = jax.lax.top_k(-jnp.abs(logits), num_uncertain)
  chosen = jnp.take_along_axis(oversampled, idx[..., None], axis=1)
  return jax.lax.stop_gradient(jnp.concatenate([chosen, random], axis=1))


def point_counts(num_points: int, oversample_ratio: float, importance_ratio: float):
  """`(oversampled, uncertain, random)` point counts, rounded as the reference does."""
  oversampled = int(num_points * oversample_ratio)
  uncertain = int(importance_ratio * num_points)
  return oversampled, uncertain, num_points - uncertain
