"""Hungarian matching: host scipy == on-device optax == brute force; costs == numpy."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from mpformer_jax.losses import matcher


def brute_force(cost: np.ndarray) -> np.ndarray:
  """Exhaustive optimum of a small `[Q, M]` problem: the query matched to each column."""
  q, m = cost.shape
  best, best_rows = np.inf, None
  for rows in itertools.permutations(range(q), m):
    total = cost[list(rows), list(range(m))].sum()
    if total < best:
      best, best_rows = total, rows
  return np.asarray(best_rows)


def _random_problem(seed, layers=2, batch=8, queries=5, slots=4):
  rng = np.random.default_rng(seed)
  cost = rng.standard_normal((layers, batch, queries, slots)).astype(np.float32)
  valid = rng.uniform(size=(batch, slots)) < 0.7
  valid[0] = False  # an image without GT
  valid[1] = True
  # Padded columns carry junk in the raw matrix; pairwise_costs would set them to the bound.
  cost = np.where(valid[None, :, None, :], cost, matcher.COST_UPPER_BOUND)
  return cost, valid


def _expected(cost, valid):
  out = np.full((cost.shape[0], cost.shape[1], cost.shape[3]), -1)
  for layer, b in itertools.product(range(cost.shape[0]), range(cost.shape[1])):
    cols = np.flatnonzero(valid[b])
    if cols.size:
      out[layer, b, cols] = brute_force(cost[layer, b][:, cols])
  return out


@pytest.mark.parametrize("method", ["scipy", "optax"])
def test_matches_brute_force_with_padding(method):
  cost, valid = _random_problem(0)
  got = jax.jit(lambda c, v: matcher.match(c, v, method))(cost, valid)
  np.testing.assert_array_equal(np.asarray(got), _expected(cost, valid))


def test_scipy_inside_shard_map_equals_unsharded(monkeypatch):
  """Under a data mesh each device solves its own images; the result is the same."""
  seen = []
  solve = matcher._scipy_assign
  monkeypatch.setattr(matcher, "_scipy_assign", lambda c, v: seen.append(c.shape) or solve(c, v))
  cost, valid = _random_problem(1, batch=8)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = jax.NamedSharding(mesh, jax.P(None, "data"))
  with jax.set_mesh(mesh):
    c = jax.device_put(cost, sharding)
    v = jax.device_put(valid, jax.NamedSharding(mesh, jax.P("data")))
    got = jax.jit(lambda c, v: matcher.match(c, v, "scipy"))(c, v)
    hlo = jax.jit(lambda c, v: matcher.match(c, v, "scipy")).lower(c, v).as_text()
  assert hlo.count("custom_call") >= 1
  np.testing.assert_array_equal(np.asarray(got), _expected(cost, valid))
  assert tuple(got.sharding.spec)[:2] == (None, "data")
  # One host call per device, each with only that device's image (all 2 layers at once).
  assert seen == [(2, 1, 5, 4)] * 8


def test_pairwise_costs_equal_numpy():
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((2, 6, 4)).astype(np.float32)
  masks = rng.standard_normal((2, 6, 30)).astype(np.float32)
  gt = rng.uniform(size=(2, 3, 30)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 3))
  valid = np.array([[True, True, False], [True, False, True]])
  w = matcher.CostWeights(2.0, 5.0, 5.0)
  got = np.asarray(matcher.pairwise_costs(logits, masks, labels, gt, valid, w))
  for b in range(2):
    probs = np.exp(logits[b]) / np.exp(logits[b]).sum(-1, keepdims=True)
    sig = 1 / (1 + np.exp(-masks[b]))
    for q, j in itertools.product(range(6), range(3)):
      if not valid[b, j]:
        assert got[b, q, j] == matcher.COST_UPPER_BOUND
        continue
      x, t = masks[b, q], gt[b, j]
      bce = np.mean(-(t * np.log(sig[q]) + (1 - t) * np.log(1 - sig[q])))
      dice = 1 - (2 * (sig[q] * t).sum() + 1) / (sig[q].sum() + t.sum() + 1)
      want = 2 * -probs[q, labels[b, j]] + 5 * bce + 5 * dice
      np.testing.assert_allclose(got[b, q, j], want, rtol=1e-5, atol=1e-5)
      del x


def test_costs_are_nan_safe():
  logits = np.full((1, 3, 3), np.nan, np.float32)
  masks = np.zeros((1, 3, 8), np.float32)
  masks[0, 1] = np.inf
  gt = np.ones((1, 2, 8), np.float32)
  cost = matcher.pairwise_costs(logits, masks, np.zeros((1, 2), int), gt, np.ones((1, 2), bool))
  assert np.all(np.isfinite(cost))
  query = matcher.match(cost[None], np.ones((1, 2), bool), "scipy")
  assert sorted(np.asarray(query)[0, 0].tolist()) != [-1, -1]


@pytest.mark.parametrize("method", ["scipy", "optax"])
def test_more_segments_than_queries(method):
  """Like the reference, leftover segments stay unmatched (-1); every query is used once."""
  rng = np.random.default_rng(3)
  cost = rng.standard_normal((1, 1, 3, 5)).astype(np.float32)
  valid = np.ones((1, 5), bool)
  got = np.asarray(matcher.match(cost, valid, method))[0, 0]
  assert sorted(got[got >= 0].tolist()) == [0, 1, 2] and np.sum(got < 0) == 2
  from scipy.optimize import linear_sum_assignment

  rows, cols = linear_sum_assignment(cost[0, 0])
  np.testing.assert_array_equal(got[cols], rows)


@pytest.mark.parametrize("count", [3, 8, 60])
def test_optax_equals_scipy_at_full_size_with_many_padded_columns(count):
  """Q = max_gt = 100 with few valid columns (padded ones hold `COST_UPPER_BOUND`).

  Regression: solving with the 1e6 padding in float32 lost the real costs' digits and gave
  another assignment than scipy.
  """
  rng = np.random.default_rng(count)
  cost = rng.random((2, 2, 100, 100)).astype(np.float32)
  valid = np.zeros((2, 100), bool)
  valid[:, :count] = True
  cost = np.where(valid[None, :, None, :], cost, matcher.COST_UPPER_BOUND).astype(np.float32)
  got = np.asarray(jax.jit(lambda c, v: matcher.match(c, v, "optax"))(cost, valid))
  np.testing.assert_array_equal(got, matcher._scipy_assign(cost, valid))
