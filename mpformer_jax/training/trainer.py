"""The training loop: data, sharded jitted steps, checkpoints, metrics, preemption.

One code path for one CPU, one GPU or many hosts: the batch is split over every device of a
`(data, fsdp)` mesh, each process feeds its own slice of the global batch, the host matcher
runs per device inside the step, and Orbax writes one checkpoint for all processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mpformer_jax import models
from mpformer_jax.data import pipeline
from mpformer_jax.losses.criterion import LossConfig
from mpformer_jax.targets import Targets
from mpformer_jax.training import checkpointing, optimizer, reporting, sharding, slot_buckets
from mpformer_jax.training.evaluation_loop import Evaluation
from mpformer_jax.training.monitors import (
  CompileCounter,
  NonFiniteGuard,
  NonFiniteLossError,
  PreemptionWatch,
)
from mpformer_jax.training.train_step import create_train_state, make_train_step

__all__ = ["NonFiniteLossError", "train_and_evaluate", "validate_config"]

TARGET_KEYS = ("segment_ids", "ids", "labels", "valid")


def validate_config(config) -> None:
  """Checks the fields the trainer relies on; errors name the field."""
  n = jax.device_count()
  t = config.training
  if t.total_steps < 1:
    raise ValueError(f"training.total_steps must be >= 1, got {t.total_steps}")
  if t.global_batch_size % n:
    raise ValueError(
      f"training.global_batch_size={t.global_batch_size} is not a multiple of the {n} devices"
    )
  micro = t.global_batch_size // t.accumulation_steps
  if t.global_batch_size % t.accumulation_steps or micro % n:
    raise ValueError(
      f"training.accumulation_steps={t.accumulation_steps}: each micro-batch must split evenly "
      f"over the {n} devices (global_batch_size={t.global_batch_size})"
    )
  if micro % config.loss.group_size:
    raise ValueError(
      f"loss.group_size={config.loss.group_size} must divide the micro-batch size {micro}"
    )
  pilot = config.model.mask_pilot
  if pilot.enabled and pilot.group_size != config.loss.group_size:
    raise ValueError(
      f"model.mask_pilot.group_size={pilot.group_size} != loss.group_size="
      f"{config.loss.group_size}: both are the reference's images per GPU"
    )
  slot_buckets.bucket_sizes(tuple(t.gt_slot_buckets), config.dataset.max_gt)
  if config.model.num_classes != config.dataset.num_classes:
    raise ValueError(
      f"model.num_classes={config.model.num_classes} != dataset.num_classes="
      f"{config.dataset.num_classes}"
    )


def _init_variables(model, image_shape, rng):
  return model.init(rng, jnp.zeros((1, *image_shape, 3), jnp.float32))


def _abstract_state(config, model, mesh):
  """`(optimizer, shape-only TrainState, its shardings on mesh)`; nothing is computed."""
  image_shape = tuple(config.dataset.crop_size)
  key = jax.random.PRNGKey(0)  # shapes only: the key's value does not matter
  abstract_vars = jax.eval_shape(lambda r: _init_variables(model, image_shape, r), key)
  tx = optimizer.create_optimizer(
    config.optimizer, config.training.total_steps, abstract_vars["params"]
  )
  abstract_state = jax.eval_shape(lambda v, r: create_train_state(v, tx, r), abstract_vars, key)
  return tx, abstract_state, sharding.state_shardings(mesh, abstract_state)


_INIT_CACHE: dict[Any, Any] = {}


def _jitted_init(model, image_shape, model_config_json: str):
  """Compiled `model.init`, once per model configuration and image shape."""
  key = (model_config_json, image_shape)
  if key not in _INIT_CACHE:
    _INIT_CACHE[key] = jax.jit(lambda rng: _init_variables(model, image_shape, rng))
  return _INIT_CACHE[key]


def load_pretrained(variables: dict[str, Any], path: str) -> dict[str, Any]:
  """Overwrites `variables` with a converted checkpoint (`mpformer_jax.convert`).

  A bare backbone checkpoint (no model config) fills `backbone`; a whole-model one fills every
  matching entry. Every loaded array must have the shape of its target; entries of the model
  that the checkpoint lacks keep their initialisation and are counted in the log.
  """
  from mpformer_jax.convert.checkpoint_io import load_converted

  model_config, loaded, _ = load_converted(path)
  if model_config is None:
    loaded = {col: {"backbone": tree} for col, tree in loaded.items()}
  flat_target = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
  flat_loaded = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  unknown = [jax.tree_util.keystr(k) for k in flat_loaded if k not in flat_target]
  if unknown:
    raise ValueError(f"training.init_from={path}: entries not in the model: {unknown[:5]}...")
  for key, value in flat_loaded.items():
    if tuple(value.shape) != tuple(flat_target[key].shape):
      raise ValueError(
        f"training.init_from={path}: {jax.tree_util.keystr(key)} has shape {value.shape}, "
        f"the model expects {flat_target[key].shape}"
      )
  logging.info(
    "init_from %s: loaded %d arrays, %d keep their initialisation",
    path,
    len(flat_loaded),
    len(flat_target) - len(flat_loaded),
  )
  leaves = [np.asarray(flat_loaded.get(k, v)) for k, v in flat_target.items()]
  return jax.tree_util.tree_unflatten(jax.tree.structure(variables), leaves)


def _global_batch(batch: dict[str, np.ndarray], mesh) -> tuple[jax.Array, Targets]:
  """This process's batch -> the global images and targets, split over every device."""
  arrays = pipeline.global_batch(
    {k: batch[k] for k in ("image", *TARGET_KEYS)}, mesh, jax.P(sharding.BATCH_AXES)
  )
  return arrays["image"], Targets(**{k: arrays[k] for k in TARGET_KEYS})


def write_results(workdir: str, results: dict[str, Any]) -> None:
  """`WORKDIR/results.json`: the latest evaluation (or final training losses), flat.

  Undefined values (NaN, e.g. COCO's APl without large objects) are written as null, so that
  the file is standard JSON for every reader.
  """
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "results.json")
  values = {
    k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in results.items()
  }
  with open(path + ".tmp", "w") as f:
    json.dump(values, f, indent=2, sort_keys=True, allow_nan=False)
  os.replace(path + ".tmp", path)


def train_and_evaluate(config, workdir: str, stop_after: int | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  Args:
    config: the whole configuration (`configs/*.py`).
    workdir: checkpoints, metrics and `results.json` go here.
    stop_after: stop (with a checkpoint) after this many steps of this call, as a preemption
      would; the next call resumes. None trains to `training.total_steps`.

  Returns:
    The final `state` and the last logged metrics (`step`, `train_*`).
  """
  from clu import metrics as clu_metrics

  validate_config(config)
  t = config.training
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.create_mesh(config.mesh.fsdp)
  model = models.build_model(config.model)
  loss_cfg = dataclasses.replace(
    LossConfig.from_config(config.loss), batch_axes=sharding.BATCH_AXES
  )

  loader = pipeline.create_train_loader(
    config.dataset,
    global_batch_size=t.global_batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    worker_count=config.dataset.worker_count,
  )
  data_iter = iter(loader)

  rng = jax.random.PRNGKey(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  image_shape = tuple(config.dataset.crop_size)

  tx, abstract_state, state_shardings = _abstract_state(config, model, mesh)

  manager = checkpointing.create_manager(
    os.path.join(workdir, "checkpoints"),
    save_every=t.checkpoint_every,
    keep=t.keep_checkpoints,
    with_data=True,
  )
  with jax.set_mesh(mesh):
    restored = checkpointing.restore_latest(
      manager,
      checkpointing.abstract_with_shardings(abstract_state, state_shardings),
      data_iterator=data_iter,
    )
    if restored is not None:
      state, start_step = restored  # `restore_latest` logs "Restored checkpoint at step N"
    else:
      start_step = 0
      variables = _jitted_init(model, image_shape, config.model.to_json())(init_rng)
      if t.init_from:
        variables = load_pretrained(variables, t.init_from)
      state = jax.jit(lambda v, r: create_train_state(v, tx, r), out_shardings=state_shardings)(
        variables, train_rng
      )

    # The same configuration on the same devices reuses the compiled step (a restarted run in
    # the same process, tests); XLA:CPU compiles take a minute even for small models.
    cache_key = (config.to_json(), tuple(d.id for d in mesh.devices.flat))
    if cache_key not in _STEP_CACHE:
      step_fn = make_train_step(
        model, loss_cfg, tx, accumulation_steps=t.accumulation_steps, remat=t.remat
      )
      batch_spec = sharding.batch_sharding(mesh)
      target_spec = Targets(*(batch_spec,) * len(TARGET_KEYS))
      _STEP_CACHE[cache_key] = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_spec, target_spec),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
      )
    train_step = _STEP_CACHE[cache_key]
    last_step = t.total_steps if stop_after is None else min(t.total_steps, start_step + stop_after)

    writer = reporting.create_writer(workdir)
    progress = reporting.ProgressReporter(t.total_steps, writer, t.log_every)
    profiler = reporting.Profiler(
      os.path.join(workdir, "tensorboard"), t.profile_first_step, t.profile_steps
    )
    guard = NonFiniteGuard(t.max_nonfinite_steps)
    ev = config.evaluation
    evaluation = None
    eval_results: dict[str, float] = {}

    def run_evaluation(step: int) -> None:
      nonlocal evaluation, eval_results
      if evaluation is None:
        evaluation = Evaluation(config, model, mesh, _variables_shardings(state_shardings), workdir)
      eval_results = evaluation(_variables(state), step, writer)
      write_results(workdir, {"step": step, **last_metrics, **eval_results})

    averages = None
    last_metrics: dict[str, float] = {}

    def record(step: int, metrics: dict[str, jax.Array]) -> None:
      """Host-side bookkeeping of step `step`; reading its metrics waits for it to finish."""
      nonlocal averages, last_metrics
      latest = manager.latest_step()
      guard.update(step, bool(metrics["finite"]), f"step {latest} in {manager.directory}")
      collection = _metrics_collection(clu_metrics, metrics)
      update = collection.single_from_model_output(**metrics)
      averages = update if averages is None else averages.merge(update)
      if step % t.log_every == 0 or step == last_step:
        scalars = {f"train_{k}": v for k, v in averages.compute().items()}
        # Counted (and warned about) by the iterator, since this process started.
        scalars["segments_dropped"] = data_iter.num_dropped_total
        writer.write_scalars(step, scalars)
        last_metrics = {k: float(v) for k, v in scalars.items()}
        averages = None

    # The metrics of step s are read after step s + 1 is dispatched, so the host never waits
    # for the device between steps (checkpoints hold the state and only the state).
    pending = None
    step = start_step
    compiled_by_first_step = None
    slot_sizes = slot_buckets.bucket_sizes(tuple(t.gt_slot_buckets), config.dataset.max_gt)
    sizes_met = {int(config.dataset.max_gt)} if len(slot_sizes) == 1 else set()
    with CompileCounter() as compiles, PreemptionWatch(manager) as preemption:
      try:
        for step in range(start_step + 1, last_step + 1):
          batch = next(data_iter)
          if len(slot_sizes) > 1:
            size = slot_buckets.choose_bucket(
              slot_buckets.largest_count(batch["valid"]), slot_sizes
            )
            batch = slot_buckets.cut_slots(batch, size)
            sizes_met.add(size)
          images, targets = _global_batch(batch, mesh)
          state, metrics = train_step(state, images, targets)  # compiles (if at all) here
          if compiled_by_first_step is None:
            compiled_by_first_step = compiles.counts["train_step"]
          if pending is not None:
            record(*pending)
          pending = (step, metrics)
          progress(step)
          profiler(step)
          # Always at the last step of this call (the end of training, or `stop_after`).
          checkpointing.save(manager, step, state, data_iter, force=step == last_step)
          if ev.every_steps and step % ev.every_steps == 0 and step != t.total_steps:
            record(*pending)  # the log line of this step comes before its evaluation
            pending = None
            run_evaluation(step)
          if preemption.reached(step):
            logging.warning("Preemption signal at step %d: saving and exiting", step)
            if step not in manager.all_steps():  # not saved by the periodic save just above
              checkpointing.save(manager, step, state, data_iter, force=True)
            break
        if pending is not None:
          record(*pending)
        if ev.at_end and step == t.total_steps and step > start_step:
          run_evaluation(step)
      except NonFiniteLossError:
        manager.wait_until_finished()
        raise
      finally:
        profiler.close()
    # One compile per slot size met is expected (one size without `gt_slot_buckets`).
    recompiles = max(compiles.counts["train_step"] - (compiled_by_first_step or 0), 0)
    if len(slot_sizes) > 1:
      recompiles = max(compiles.counts["train_step"] - len(sizes_met), 0)
    if recompiles:
      logging.warning("The train step recompiled %d times after its first step", recompiles)
    if restored is not None and start_step >= t.total_steps:
      logging.info("Nothing to do: the checkpoint is at step %d >= total_steps", start_step)
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    writer.close()

  results = {"step": int(step), **last_metrics, **eval_results}
  write_results(workdir, results)
  return {
    "state": state,
    "skipped_steps_this_run": guard.total,
    "train_step_compiles": compiles.counts["train_step"],
    "train_step_recompiles": recompiles,
    "gt_slot_sizes_met": sorted(sizes_met),
    "train_images_filtered_empty": data_iter.num_filtered_empty,
    **results,
  }


def _variables(state) -> dict[str, Any]:
  """The model variables of a training state (what `model.apply` takes)."""
  return {"params": state.params, **state.model_state}


def _variables_shardings(state_shardings) -> dict[str, Any]:
  return {"params": state_shardings.params, **state_shardings.model_state}


def restore_for_inference(config, workdir: str):
  """Restores `config.evaluation.checkpoint_step` of `workdir` (-1: the newest).

  Returns:
    `(model, mesh, variables, variables_shardings, step)`.

  Raises:
    FileNotFoundError: when the checkpoint does not exist.
  """
  mesh = sharding.create_mesh(config.mesh.fsdp)
  model = models.build_model(config.model)
  _, abstract_state, state_shardings = _abstract_state(config, model, mesh)
  directory = os.path.join(workdir, "checkpoints")
  manager = checkpointing.create_manager(directory, save_every=1, keep=1000, with_data=False)
  step = config.evaluation.checkpoint_step
  step = manager.latest_step() if step < 0 else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(
      f"evaluation.checkpoint_step={config.evaluation.checkpoint_step}: no such checkpoint in "
      f"{directory} (have: {sorted(manager.all_steps())})"
    )
  with jax.set_mesh(mesh):
    state = checkpointing.restore(
      manager, step, checkpointing.abstract_with_shardings(abstract_state, state_shardings)
    )
  manager.close()
  return model, mesh, _variables(state), _variables_shardings(state_shardings), int(step)


def evaluate_checkpoint(config, workdir: str) -> dict[str, Any]:
  """`--mode eval`: restores a checkpoint of `workdir` and evaluates it.

  The checkpoint is `config.evaluation.checkpoint_step`, or the newest when it is -1. The
  metrics go to the writers and to `WORKDIR/results.json` (with `"step"`).

  Raises:
    FileNotFoundError: when the checkpoint does not exist.
  """
  model, mesh, variables, variables_shardings, step = restore_for_inference(config, workdir)
  writer = reporting.create_writer(workdir)
  evaluation = Evaluation(config, model, mesh, variables_shardings, workdir)
  results = {"step": step, **evaluation(variables, step, writer)}
  writer.flush()
  writer.close()
  write_results(workdir, results)
  return results


def _metrics_collection(clu_metrics, metrics: dict[str, jax.Array]):
  """A CLU collection averaging every scalar the step returns (one class per key set)."""
  keys = tuple(sorted(metrics))
  if keys not in _COLLECTIONS:
    fields = {k: clu_metrics.Average.from_output(k) for k in keys if k != "skipped_steps"}
    fields["skipped_steps"] = clu_metrics.LastValue.from_output("skipped_steps")
    _COLLECTIONS[keys] = clu_metrics.Collection.create(**fields)
  return _COLLECTIONS[keys]


_COLLECTIONS: dict[tuple[str, ...], Any] = {}
_STEP_CACHE: dict[Any, Any] = {}
