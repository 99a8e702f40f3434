"""The train step's guards and the loop's watchdogs: non-finite steps, recompilation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mpformer_jax import models
from mpformer_jax.losses.criterion import LossConfig
from mpformer_jax.training.monitors import CompileCounter, NonFiniteGuard, NonFiniteLossError
from mpformer_jax.training.train_step import create_train_state, guarded_update, make_train_step
from tests.helpers import random_targets, random_variables, tiny_model_config


@pytest.fixture(scope="module")
def step_setup():
  config = tiny_model_config(num_layers=2)
  config.pixel_decoder.num_layers = 1
  model = models.build_model(config)
  variables = random_variables(model, (64, 64), seed=0)
  tx = optax.adamw(1e-3)
  state = create_train_state(variables, tx, jax.random.PRNGKey(0))
  step = jax.jit(make_train_step(model, LossConfig(num_points=64, group_size=2), tx))
  images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
  targets = random_targets(0, batch=2, size=(64, 64), max_gt=4, num_classes=5)
  return step, state, images, targets


def _max_abs_diff(a, b) -> float:
  return max(
    float(jnp.max(jnp.abs(x - y))) for x, y in zip(*map(jax.tree.leaves, (a, b)), strict=True)
  )


def test_non_finite_loss_skips_the_update_and_is_counted(step_setup):
  step, state, images, targets = step_setup
  with CompileCounter() as compiles:
    good, metrics = step(state, images, targets)
    assert float(metrics["finite"]) == 1.0 and int(good.skipped_steps) == 0
    assert _max_abs_diff(good.params, state.params) > 0  # a real update happened

    bad_images = images.copy()
    bad_images[0, 3, 5, 1] = np.nan  # one NaN pixel poisons the loss and every gradient
    skipped, metrics = step(good, bad_images, targets)
    assert float(metrics["finite"]) == 0.0 and not np.isfinite(float(metrics["loss"]))
    assert int(skipped.skipped_steps) == 1 and int(skipped.step) == int(good.step) + 1
    assert _max_abs_diff(skipped.params, good.params) == 0
    assert _max_abs_diff(skipped.opt_state, good.opt_state) == 0

    after, metrics = step(skipped, images, targets)
    assert float(metrics["finite"]) == 1.0 and int(after.skipped_steps) == 1
    assert np.isfinite(float(metrics["loss"]))
  # Same shapes every step: the step compiled exactly once (or not at all if cached).
  assert compiles.counts["train_step"] <= 1, compiles.counts


def _guarded_update_fn(num_leaves: int):
  params = {f"w{i}": jnp.full((4, 8), float(i)) for i in range(num_leaves)}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = create_train_state({"params": params}, tx, jax.random.PRNGKey(0))

  def update(state, loss, grads):
    return guarded_update(state, tx, loss, grads, state.model_state)

  return jax.jit(update), state, params


def test_guarded_update_skips_a_non_finite_gradient_under_a_finite_loss():
  update, state, params = _guarded_update_fn(5)
  grads = jax.tree.map(jnp.ones_like, params)
  new, finite, norm = update(state, jnp.float32(1.0), grads)
  assert bool(finite) and float(norm) == pytest.approx(np.sqrt(5 * 32))
  assert _max_abs_diff(new.params, params) > 0
  for bad in (np.inf, -np.inf, np.nan):
    poisoned = {**grads, "w3": grads["w3"].at[1, 2].set(bad)}
    new, finite, _ = update(state, jnp.float32(1.0), poisoned)
    assert not bool(finite) and int(new.skipped_steps) == 1
    assert _max_abs_diff(new.params, params) == 0
    assert _max_abs_diff(new.opt_state, state.opt_state) == 0


def test_compiled_step_checks_finiteness_once_not_once_per_parameter(step_setup):
  # Regression: `all(isfinite)` per gradient leaf, reduced over the leaves, is a chain of cheap
  # `and`s that XLA copied into every parameter's update fusion: 43k `and` ops here, 776k HLO
  # lines and 7 minutes of compiling at configs/synthetic.py. The flag now comes from the norm.
  step, state, images, targets = step_setup
  text = step.lower(state, images, targets).compile().as_text()
  leaves = len(jax.tree.leaves(state.params))
  assert text.count(" and(") < 10 * leaves, (text.count(" and("), leaves)


def test_compile_counter_sees_recompilations():
  def fn(x):
    return x * 2

  f = jax.jit(fn)
  with CompileCounter() as compiles:
    f(jnp.ones(3))
    f(jnp.ones(3))
    assert compiles.counts["fn"] == 1
    f(jnp.ones(4))  # a new shape recompiles
  assert compiles.counts["fn"] == 2 and compiles.seconds["fn"] > 0
  f(jnp.ones(5))  # after the context: not counted
  assert compiles.counts["fn"] == 2


def test_non_finite_guard_stops_after_max_in_a_row():
  guard = NonFiniteGuard(max_in_a_row=3)
  for step, finite in enumerate([True, False, False, True, False, False], start=1):
    guard.update(step, finite)
  assert guard.total == 4 and guard.in_a_row == 2
  with pytest.raises(NonFiniteLossError, match=r"3 consecutive .* step 7.*step 4 in /ckpt"):
    guard.update(7, False, "step 4 in /ckpt")
  with pytest.raises(ValueError, match="max_nonfinite_steps"):
    NonFiniteGuard(0)


@pytest.mark.slow  # ~90 s of compiling on 2 cores; kept out of the 30-minute CI
def test_gradient_accumulation_averages_the_micro_batch_gradients(step_setup):
  """2 micro-batches == the mean of the gradients of each (its own GT normaliser and RNG)."""
  from mpformer_jax.training.objective import make_loss_fn

  _, state, images, targets = step_setup
  config = tiny_model_config(num_layers=2)
  config.pixel_decoder.num_layers = 1
  model = models.build_model(config)
  loss_cfg = LossConfig(num_points=64, group_size=1)
  tx = optax.sgd(1.0)  # the update is minus the gradient: easy to compare
  state = create_train_state({"params": state.params, **state.model_state}, tx, state.rng)
  step = jax.jit(make_train_step(model, loss_cfg, tx, accumulation_steps=2))
  new_state, metrics = step(state, images, targets)

  grad_fn = jax.jit(jax.grad(make_loss_fn(model, loss_cfg), has_aux=True))
  rng = jax.random.fold_in(state.rng, state.step)
  grads = []
  for j in range(2):  # micro-batch j holds images j, j + 2, ... (spread over devices)
    micro = jax.tree.map(lambda x, j=j: np.asarray(x)[j::2], targets)
    g, _ = grad_fn(state.params, state.model_state, images[j::2], micro, jax.random.fold_in(rng, j))
    grads.append(g)
  expected = jax.tree.map(lambda p, a, b: p - (a + b) / 2, state.params, *grads)
  assert float(metrics["finite"]) == 1.0
  jax.tree_util.tree_map_with_path(
    lambda path, x, y: np.testing.assert_allclose(
      x, y, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path)
    ),
    new_state.params,
    expected,
  )
