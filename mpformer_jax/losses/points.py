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
  idx = smallest_k_indices(jnp.abs(logits), num_uncertain)
  chosen = jnp.take_along_axis(oversampled, idx[..., None], axis=1)
  return jax.lax.stop_gradient(jnp.concatenate([chosen, random], axis=1))


def smallest_k_indices(values: jax.Array, k: int) -> jax.Array:
  """Positions of the `k` smallest entries of each row, in increasing position order.

  The same set as `lax.top_k(-values, k)` (ties go to the lower position), without sorting:
  XLA:CPU's top-k sorts every row and took 24 ms of a 40 ms mask loss at the synthetic config.
  The losses only sum over the chosen points, so their order does not matter. A bisection on
  the float bits finds each row's k-th smallest value (non-negative floats order like their
  int32 bit patterns), then ties at that value are taken in position order.

  Args:
    values: float32 `[N, S]`, non-negative (NaN rows give arbitrary in-range positions).
    k: how many to keep, `k <= S`.

  Returns:
    int32 `[N, k]`.
  """
  bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)
  n, s = values.shape

  def bisect(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    # Counts in float32 (exact below 2**24): XLA:CPU's float sum is ~1.5x faster than int32's.
    enough = jnp.sum((bits <= mid[:, None]).astype(jnp.float32), axis=1) >= k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  # Invariant: the k-th smallest bit pattern lies in [lo, hi]; 31 halvings close the range.
  inf_bits = 0x7F800000
  lo, _ = jax.lax.fori_loop(
    0, 31, bisect, (jnp.zeros((n,), jnp.int32), jnp.full((n,), inf_bits, jnp.int32))
  )
  kth = lo[:, None]
  at_most = bits <= kth

  def with_ties(_):
    # Some row has more entries equal to its k-th value than it needs: take those tied entries
    # in position order.
    below = bits < kth
    tied = bits == kth
    ties_needed = k - jnp.sum(below, axis=1, keepdims=True)
    return below | (tied & (prefix_counts(tied) <= ties_needed))

  # Ties at the k-th value are rare for real logits; the prefix count they need is skipped then.
  excess = jnp.any(jnp.sum(at_most, axis=1) > k)
  chosen = jax.lax.cond(excess, with_ties, lambda _: at_most, None)
  # Compaction: the j-th chosen entry of a row goes to output slot j (exactly k per row).
  slot = jnp.where(chosen, prefix_counts(chosen) - 1, k)
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (n, s))
  out = jnp.zeros((n, k), jnp.int32)
  return jax.vmap(lambda o, i, p: o.at[i].set(p, mode="drop"))(out, slot, positions)


def prefix_counts(mask: jax.Array) -> jax.Array:
  """Inclusive running count of True along each row of a bool `[N, S]`: int32 `[N, S]`.

  `jnp.cumsum` is a slow reduce-window on XLA:CPU (9 ms for the 1.2M entries of 32 x 37632
  oversampled points); the log-depth `associative_scan` takes 3 ms (a triangular-matrix product
  per 128-entry block took 10 ms).
  """
  return jax.lax.associative_scan(jnp.add, mask.astype(jnp.int32), axis=1)


def point_counts(num_points: int, oversample_ratio: float, importance_ratio: float):
  """`(oversampled, uncertain, random)` point counts, rounded as the reference does."""
  oversampled = int(num_points * oversample_ratio)
  uncertain = int(importance_ratio * num_points)
  return oversampled, uncertain, num_points - uncertain
