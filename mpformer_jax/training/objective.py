"""The training objective as a pure function of the parameters (for `jax.grad`).

Imports only jax/flax and the project's jax-only modules, so benchmarks can run it on machines
without TensorFlow, TFDS or CLU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from mpformer_jax.losses.criterion import LossConfig, set_criterion
from mpformer_jax.targets import Targets

# Independent random streams: dropout/drop path, MP label flips, MP mask noise, loss points
# (the criterion splits the last into matcher points and uncertainty points).
RNG_STREAMS = ("dropout", "label_noise", "mask_noise", "loss")


def split_rngs(rng: jax.Array) -> dict[str, jax.Array]:
  """One key per stream of `RNG_STREAMS`."""
  return dict(zip(RNG_STREAMS, jax.random.split(rng, len(RNG_STREAMS)), strict=True))


def make_loss_fn(model, loss_cfg: LossConfig) -> Callable[..., Any]:
  """`loss_fn(params, state, images, targets, rng) -> (total, (terms, new_state))`.

  `state` holds the non-trainable collections (`batch_stats`); with BatchNorm in training mode
  `new_state` carries the updated statistics (over the global batch under sharded jit).
  """

  def loss_fn(params, state, images: jax.Array, targets: Targets, rng: jax.Array):
    rngs = split_rngs(rng)
    loss_rng = rngs.pop("loss")
    outputs, new_state = model.apply(
      {"params": params, **state},
      images,
      train=True,
      targets=targets,
      rngs=rngs,
      mutable=list(state),
    )
    total, terms = set_criterion(outputs, targets, loss_rng, loss_cfg)
    return total, (terms, new_state)

  return loss_fn
