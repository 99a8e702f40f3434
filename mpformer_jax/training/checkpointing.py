"""Orbax checkpoints of the training state and of the input pipeline's position.

A checkpoint at step `s` holds the `TrainState` after `s` steps (item `state`) and, when the
input iterator can report its position, the grain iterator state of every process (item
`data`, one file per process). Saves are asynchronous; a save interrupted by `kill -9` leaves
a temporary directory that Orbax ignores, so only that save is lost.

Restoring takes the target shardings from the caller, so a checkpoint written on 8 devices
restores onto 1 (or onto any mesh).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


def create_manager(
  directory: str, save_every: int, keep: int, with_data: bool, async_save: bool = True
) -> ocp.CheckpointManager:
  """A manager for `directory` (created if needed).

  Args:
    directory: where checkpoints live (`WORKDIR/checkpoints`).
    save_every: steps between periodic saves (the trainer also saves at the last step and on
      preemption, whatever the interval).
    keep: checkpoints to keep (oldest deleted first).
    with_data: also handle the input iterator's state (item `data`).
    async_save: write in a background thread while training continues.
  """
  handlers = {"state": ocp.StandardCheckpointHandler()}
  if with_data:
    import grain

    handlers["data"] = grain.checkpoint.CheckpointHandler()
  options = ocp.CheckpointManagerOptions(
    save_interval_steps=save_every,
    max_to_keep=keep,
    enable_async_checkpointing=async_save,
    create=True,
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def save(
  manager: ocp.CheckpointManager, step: int, state: Any, data_iterator=None, force=False
) -> bool:
  """Saves if `step` is due (or `force`); returns whether a save started."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:  # the manager must have been created `with_data`
    import grain

    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore_latest(
  manager: ocp.CheckpointManager, abstract_state: Any, data_iterator=None
) -> tuple[Any, int] | None:
  """Restores the newest checkpoint onto the shardings of `abstract_state`.

  Args:
    manager: from `create_manager`.
    abstract_state: `jax.ShapeDtypeStruct` leaves with `sharding` set (the target layout).
    data_iterator: grain iterator whose position is restored in place (if checkpointed).

  Returns:
    `(state, step)`, or None when the directory holds no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return None
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    # grain writes one file per process, named after the process count.
    data_file = os.path.join(
      str(manager.directory),
      str(step),
      "data",
      f"process_{jax.process_index()}-of-{jax.process_count()}.json",
    )
    if os.path.exists(data_file):
      import grain

      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    else:
      logging.warning(
        "Checkpoint %d has no input-pipeline state for process %d of %d (saved with another "
        "process count?): the data stream starts from the beginning",
        step,
        jax.process_index(),
        jax.process_count(),
      )
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  logging.info("Restored checkpoint at step %d from %s", step, manager.directory)
  return restored["state"], step


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """`ShapeDtypeStruct`s of `tree` placed on `shardings` (the target of a restore)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """The training state of checkpoint `step` (no input-pipeline state), onto its shardings."""
  restored = manager.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
  )
  logging.info("Restored checkpoint at step %d from %s", step, manager.directory)
  return restored["state"]
