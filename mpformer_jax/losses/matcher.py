"""Hungarian matching of predictions to ground truth (Mask2Former `HungarianMatcher`).

The cost of assigning query q to GT segment j (spec section 3) is

  C = class_weight * (-softmax(logits_q)[label_j])
    + mask_weight  * mean_p BCE(mask_q(p), gt_j(p))
    + dice_weight  * (1 - (2 sum_p s t + 1) / (sum_p s + sum_p t + 1)),   s = sigmoid(mask_q(p))

over points p shared by all queries and segments of an image. Costs are computed on the device
(`criterion.matching_costs`, one prediction at a time); the assignments of all predictions are
solved together, either on the host with scipy (through one `jax.pure_callback` per step,
inside `jax.shard_map` so that each device solves only its own images) or on the device with
optax's exact Hungarian algorithm. Both give the same matches.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

# Padded GT columns get this cost: finite (the solvers need finite input) and above any real
# cost, which is at most |class| + |BCE| + |dice| weighted, far below it.
COST_UPPER_BOUND = 1e6


@dataclasses.dataclass(frozen=True)
class CostWeights:
  """Weights of the matching cost terms (the reference: 2 / 5 / 5; Hugging Face uses class 1)."""

  class_weight: float = 2.0
  mask_weight: float = 5.0
  dice_weight: float = 5.0


def softplus_and_sigmoid(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(softplus(x), sigmoid(x))` from one exponential, stable for any finite `x`.

  `jax.nn.softplus` (`logaddexp(x, 0)`) is ~4x slower than this on XLA:CPU, and the matcher
  evaluates both functions at every point of every query of every prediction.
  """
  e = jnp.exp(-jnp.abs(x))
  softplus = jnp.maximum(x, 0.0) + jnp.log1p(e)
  sigmoid = jnp.where(x >= 0, 1.0, e) / (1.0 + e)
  return softplus, sigmoid


def pairwise_costs(
  logits: jax.Array,
  mask_logits: jax.Array,
  labels: jax.Array,
  gt_masks: jax.Array,
  valid: jax.Array,
  weights: CostWeights = CostWeights(),
  points_first: bool = False,
) -> jax.Array:
  """Matching costs between every query and every GT slot, in float32.

  Args:
    logits: `[..., Q, K + 1]` class logits.
    mask_logits: `[..., Q, P]` mask logits at the image's points (`[..., P, Q]` with
      `points_first`, the layout that sampling query-last masks gives).
    labels: int `[..., M]` GT classes.
    gt_masks: `[..., M, P]` GT masks at the same points (fractional at boundaries).
    valid: bool `[..., M]`.
    weights: the cost weights.
    points_first: the layout of `mask_logits`.

  Returns:
    float32 `[..., Q, M]`; invalid columns and any non-finite entry hold `COST_UPPER_BOUND`.
  """
  logits = logits.astype(jnp.float32)
  x = mask_logits.astype(jnp.float32)
  t = gt_masks.astype(jnp.float32)
  points_axis, queries = (-2, "pq") if points_first else (-1, "qp")
  num_points = x.shape[points_axis]
  probs = jax.nn.softmax(logits, axis=-1)
  labels = jnp.clip(labels, 0, logits.shape[-1] - 2)
  cost_class = -jnp.take_along_axis(probs, labels[..., None, :], axis=-1)  # [..., Q, M]
  # Mean BCE over points: BCE(x, t) = softplus(x) - x * t, so one product with the GT suffices
  # (the reference takes two, with softplus(-x) and softplus(x)). [..., Q, P] arrays are the
  # largest of the step (100 MB at 256x256 with 10 predictions): each is made once.
  softplus, s = softplus_and_sigmoid(x)
  with_gt = lambda a: jnp.einsum(f"...{queries},...mp->...qm", a, t)
  cost_mask = (softplus.sum(points_axis)[..., None] - with_gt(x)) / num_points
  numerator = 2 * with_gt(s)
  denominator = s.sum(points_axis)[..., :, None] + t.sum(-1)[..., None, :]
  cost_dice = 1 - (numerator + 1) / (denominator + 1)
  cost = (
    weights.class_weight * cost_class
    + weights.mask_weight * cost_mask
    + weights.dice_weight * cost_dice
  )
  cost = jnp.where(valid[..., None, :], cost, COST_UPPER_BOUND)
  return jnp.where(jnp.isfinite(cost), cost, COST_UPPER_BOUND)


def _scipy_assign(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Host solver: `cost` `[L, B, Q, M]`, `valid` `[B, M]` -> matched query per slot `[L, B, M]`."""
  cost = np.asarray(cost)
  valid = np.asarray(valid)
  out = np.full((cost.shape[0], cost.shape[1], cost.shape[3]), -1, np.int32)
  for b in range(cost.shape[1]):
    cols = np.flatnonzero(valid[b])
    if cols.size == 0:
      continue
    for layer in range(cost.shape[0]):
      rows, picked = scipy.optimize.linear_sum_assignment(cost[layer, b][:, cols])
      out[layer, b, cols[picked]] = rows
  return out


def _scipy_callback(cost: jax.Array, valid: jax.Array) -> jax.Array:
  shape = jax.ShapeDtypeStruct((cost.shape[0], cost.shape[1], cost.shape[3]), jnp.int32)
  return jax.pure_callback(_scipy_assign, shape, cost, valid, vmap_method="sequential")


def _optax_assign(cost: jax.Array, valid: jax.Array) -> jax.Array:
  """On-device exact Hungarian: same contract as `_scipy_assign`.

  Solved on the full `[Q, M]` matrix: padded columns all cost the same `c`, so however they are
  assigned, the valid columns get the assignment of the sliced problem. `c` exceeds every real
  cost by more than their spread, so that with fewer queries than columns no query prefers a
  padded column. It is *not* `COST_UPPER_BOUND`: in float32, sums of many 1e6 entries lose the
  real costs' digits, and the solver then returns a different (wrong) assignment.
  """
  import optax

  def one(c, v):
    real = jnp.where(v[None, :], c, jnp.nan)
    high, low = jnp.nanmax(real), jnp.nanmin(real)
    padded_cost = jnp.where(jnp.isfinite(high), 2.0 * high - low + 1.0, 0.0)
    c = jnp.where(v[None, :], c, padded_cost)
    rows, cols = optax.assignment.hungarian_algorithm(c)
    query = jnp.full((c.shape[1],), -1, jnp.int32).at[cols].set(rows.astype(jnp.int32))
    return jnp.where(v, query, -1)

  per_image = jax.vmap(one)
  return jax.vmap(per_image, in_axes=(0, None))(cost, valid)


def match(
  cost: jax.Array,
  valid: jax.Array,
  method: str = "scipy",
  batch_axes: tuple[str, ...] = ("data",),
) -> jax.Array:
  """Optimal one-to-one assignment of queries to valid GT slots, for every prediction.

  Args:
    cost: float32 `[L, B, Q, M]` from `pairwise_costs` (L predictions). Not differentiated.
    valid: bool `[B, M]`.
    method: "scipy" (host, one callback per step) or "optax" (on device).
    batch_axes: mesh axes the batch is sharded over; with the scipy method each device then
      solves only its local images (`jax.shard_map` over the current mesh, see `jax.set_mesh`).

  Returns:
    int32 `[L, B, M]`: the query matched to each GT slot, -1 for invalid slots (and, as in the
    reference, for the segments left over when an image has more of them than queries).
  """
  cost = jax.lax.stop_gradient(cost)
  if method == "optax":
    return _optax_assign(cost, valid)
  if method != "scipy":
    raise ValueError(f"loss.matcher: expected 'scipy' or 'optax', got {method!r}")
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in batch_axes if not mesh.empty and a in mesh.axis_names)
  if not axes:
    return _scipy_callback(cost, valid)
  spec = jax.P(axes) if len(axes) > 1 else jax.P(axes[0])
  batch_spec = jax.P(None, *spec)
  return jax.shard_map(
    _scipy_callback,
    mesh=mesh,
    in_specs=(batch_spec, spec),
    out_specs=batch_spec,
    check_vma=False,
  )(cost, valid)


__all__ = [
  "COST_UPPER_BOUND",
  "CostWeights",
  "match",
  "pairwise_costs",
  "softplus_and_sigmoid",
]
