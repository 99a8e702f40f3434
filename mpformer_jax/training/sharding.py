"""The device mesh and how the batch and the training state are laid out on it.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism that also
shards parameters and optimiser state, for large backbones). The batch is split over both;
with `fsdp == 1` (the default) everything but the batch is replicated.

Both axes are `AxisType.Auto`: the model relies on XLA's sharding propagation (explicit axes
would ask every op for a sharding rule).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

BATCH_AXES = ("data", "fsdp")


def create_mesh(fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
  """A `(data, fsdp)` mesh over all devices (of all processes).

  Args:
    fsdp: size of the parameter-sharding axis; must divide the device count.
    devices: optional explicit device list (default: `jax.devices()`).
  """
  devices = jax.devices() if devices is None else devices
  count = len(devices)
  if fsdp < 1 or count % fsdp:
    raise ValueError(f"mesh.fsdp: {fsdp} does not divide the {count} devices")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((count // fsdp, fsdp), BATCH_AXES, axis_types=(auto, auto), devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
  """Leading (batch) axis split over every device."""
  return jax.NamedSharding(mesh, jax.P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
  return jax.NamedSharding(mesh, jax.P())


def _fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> jax.P:
  """Shards the largest dimension divisible by `fsdp`; small or indivisible leaves replicate."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return jax.P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return jax.P(*spec)
  return jax.P()


def state_shardings(mesh: jax.sharding.Mesh, abstract_state: Any, min_size: int = 2**14) -> Any:
  """A `NamedSharding` per leaf of a (shape-only) training state."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
    lambda x: jax.NamedSharding(mesh, _fsdp_spec(tuple(x.shape), fsdp, min_size)),
    abstract_state,
  )
