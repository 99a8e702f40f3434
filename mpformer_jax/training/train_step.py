"""The functional training step: loss, gradients, a guarded optimiser update.

Imports only jax/flax/optax and the project's jax-only modules, so benchmarks can run it on
machines without TensorFlow, TFDS or CLU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mpformer_jax.losses.criterion import LossConfig
from mpformer_jax.targets import Targets
from mpformer_jax.training.objective import make_loss_fn


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (and checkpoints).

  Attributes:
    step: int32 scalar, optimiser steps attempted (skipped ones included).
    params: trainable parameters.
    opt_state: optax state.
    model_state: non-trainable collections (`{"batch_stats": ...}`).
    rng: base key; step `s` uses `fold_in(rng, s)`, so a resumed run draws the same numbers.
    skipped_steps: int32 scalar, updates skipped because the loss or a gradient was not finite.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any
  rng: jax.Array
  skipped_steps: jax.Array


def create_train_state(
  variables: dict[str, Any], tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    model_state={k: v for k, v in variables.items() if k != "params"},
    rng=rng,
    skipped_steps=jnp.zeros((), jnp.int32),
  )


def guarded_update(
  state: TrainState, tx: optax.GradientTransformation, loss, grads, new_model_state
) -> tuple[TrainState, jax.Array, jax.Array]:
  """The optimiser update, applied only when the loss and every gradient are finite.

  A non-finite loss or gradient leaves parameters, optimiser and BN statistics untouched and
  counts the step in `skipped_steps`.

  Returns:
    `(new_state, finite, grad_norm)`: `finite` a bool scalar, `grad_norm` the global gradient
    norm before clipping.
  """
  # One flag for the whole update, from the global norm: a NaN or Inf anywhere makes the sum of
  # squares non-finite (so does a norm beyond float range, ~1e19, which no healthy step has).
  # A per-leaf `isfinite` reduced over all leaves says the same, but it is a chain of cheap ops
  # that XLA copies into every parameter's update fusion: the compiled step then grows with
  # the square of the number of parameter arrays (776k HLO lines and 297 s of compiling at
  # `configs/synthetic.py`; `tests/test_train_step.py` counts the copies).
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)

  def keep_if_finite(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  new_state = state.replace(
    step=state.step + 1,
    params=keep_if_finite(new_params, state.params),
    opt_state=keep_if_finite(new_opt_state, state.opt_state),
    model_state=keep_if_finite(new_model_state, state.model_state),
    skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
  )
  return new_state, finite, grad_norm


def _split_micro(x: jax.Array, micro: int) -> jax.Array:
  """`[B, ...]` -> `[micro, B / micro, ...]`, keeping each micro-batch spread over the devices.

  Image `i` goes to micro-batch `i % micro`, so that with a batch sharded over devices every
  device holds a part of every micro-batch.
  """
  return jnp.swapaxes(x.reshape(x.shape[0] // micro, micro, *x.shape[1:]), 0, 1)


def make_train_step(
  model,
  loss_cfg: LossConfig,
  tx: optax.GradientTransformation,
  accumulation_steps: int = 1,
  remat: bool = False,
) -> Callable[[TrainState, jax.Array, Targets], tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step(state, images, targets) -> (new_state, metrics)`, to be wrapped in `jax.jit`.

  Args:
    model: the `Mask2Former` module.
    loss_cfg: the objective's settings.
    tx: the optimiser.
    accumulation_steps: micro-batches per step; gradients are averaged over them (each one's
      loss is normalised by its own GT count, as separate reference steps would be).
    remat: recompute activations in the backward pass except matmul outputs (less memory).

  Returns:
    The step function. `metrics` holds every loss term and `loss` (averaged over
    micro-batches), `grad_norm` (before clipping), `finite` (1.0 if the update was applied)
    and `skipped_steps`.
  """
  loss_fn = make_loss_fn(model, loss_cfg)
  if remat:
    loss_fn = jax.checkpoint(loss_fn, policy=jax.checkpoint_policies.dots_saveable)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, images: jax.Array, targets: Targets):
    rng = jax.random.fold_in(state.rng, state.step)
    if accumulation_steps == 1:
      (loss, (terms, new_model_state)), grads = grad_fn(
        state.params, state.model_state, images, targets, rng
      )
    else:
      micro_images = _split_micro(images, accumulation_steps)
      micro_targets = jax.tree.map(lambda x: _split_micro(x, accumulation_steps), targets)

      def body(carry, inputs):
        model_state, grad_sum = carry
        index, x, t = inputs
        (loss, (terms, model_state)), grads = grad_fn(
          state.params, model_state, x, t, jax.random.fold_in(rng, index)
        )
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (model_state, grad_sum), (loss, terms)

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (new_model_state, grad_sum), (losses, terms) = jax.lax.scan(
        body,
        (state.model_state, zeros),
        (jnp.arange(accumulation_steps), micro_images, micro_targets),
      )
      grads = jax.tree.map(lambda g: g / accumulation_steps, grad_sum)
      loss = jnp.mean(losses)
      terms = jax.tree.map(lambda x: jnp.mean(x, axis=0), terms)

    new_state, finite, grad_norm = guarded_update(state, tx, loss, grads, new_model_state)
    metrics = {
      **terms,
      "loss": loss,
      "grad_norm": grad_norm,
      "finite": finite.astype(jnp.float32),
      "skipped_steps": new_state.skipped_steps,
    }
    return new_state, metrics

  return train_step
