"""Random draws keyed by (image, group, slot), so that padding never changes a real slot's draw.

Drawing one `[B, M, ...]` array would tie every slot's randomness to `M`; with per-slot keys a
segment gets the same points, label flip and mask noise whatever `max_gt` the batch is padded to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def slot_keys(rng: jax.Array, batch: int, groups: int, slots: int) -> jax.Array:
  """Keys `[B, G * M]` with key `[b, g * M + j] = fold_in(fold_in(fold_in(rng, b), g), j)`."""
  fold = lambda key, i: jax.random.fold_in(key, i)
  per_slot = lambda key: jax.vmap(lambda j: fold(key, j))(jnp.arange(slots))
  per_group = lambda key: jax.vmap(lambda g: per_slot(fold(key, g)))(jnp.arange(groups))
  keys = jax.vmap(lambda b: per_group(fold(rng, b)))(jnp.arange(batch))  # [B, G, M, ...]
  return keys.reshape(batch, groups * slots, *keys.shape[3:])


def slot_uniform(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform [0, 1) draws `[*keys.shape, *shape]`, one independent stream per key."""
  flat = keys.reshape(-1, *keys.shape[2:]) if keys.ndim > 2 else keys.reshape(-1)
  draws = jax.vmap(lambda k: jax.random.uniform(k, shape))(flat)
  return draws.reshape(*keys.shape[:2], *shape)


def slot_randint(keys: jax.Array, low: int, high: int) -> jax.Array:
  """One integer in [low, high) per key: `[*keys.shape]`."""
  flat = keys.reshape(-1, *keys.shape[2:]) if keys.ndim > 2 else keys.reshape(-1)
  draws = jax.vmap(lambda k: jax.random.randint(k, (), low, high))(flat)
  return draws.reshape(keys.shape[:2])
