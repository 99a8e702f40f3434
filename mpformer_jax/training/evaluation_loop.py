"""Evaluation inside training runs and of saved checkpoints: loader, jitted predictions, outputs.

Results go to the metric writers (`eval_*` scalars, overlay images) and are returned flat; the
caller writes `WORKDIR/results.json`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from mpformer_jax.data import pipeline
from mpformer_jax.data.config import eval_original_canvas
from mpformer_jax.data.metadata import dataset_metadata
from mpformer_jax.training import sharding

_PREDICT_CACHE: dict[Any, Any] = {}


def jit_predict(
  model,
  meta,
  evaluation_config,
  output_size,
  mesh,
  variables_shardings,
  with_confusion=True,
):
  """The jitted `evaluator.make_predict_fn` step, inputs sharded over the batch of `mesh`."""
  from mpformer_jax.evaluation import evaluator

  predict = evaluator.make_predict_fn(
    model,
    meta,
    evaluator.EvalSettings.from_config(evaluation_config),
    output_size,
    with_confusion,
  )
  batch = sharding.batch_sharding(mesh)
  # Outputs keep the batch sharding XLA propagates; the confusion matrix is a global sum.
  return jax.jit(predict, in_shardings=(variables_shardings, batch, batch, batch, batch))


class Evaluation:
  """Evaluates training states on `config.dataset`'s eval split, over `mesh`.

  Args:
    config: the whole configuration (`dataset`, `evaluation`, `model`).
    model: the network.
    mesh: the device mesh.
    variables_shardings: shardings of `{"params": ..., **model_state}`.
    workdir: overlays go to `WORKDIR/overlays/step_<N>/`.
  """

  def __init__(self, config, model, mesh, variables_shardings, workdir: str):
    from mpformer_jax.evaluation import evaluator

    self._evaluator = evaluator
    self._config = config
    self._mesh = mesh
    self._workdir = workdir
    self.meta = dataset_metadata(config.dataset)
    self.loader = pipeline.create_eval_loader(
      config.dataset, global_batch_size=config.evaluation.batch_size
    )
    key = (config.model.to_json(), config.evaluation.to_json(), config.dataset.to_json())
    key += (tuple(d.id for d in mesh.devices.flat),)
    if key not in _PREDICT_CACHE:
      _PREDICT_CACHE[key] = jit_predict(
        model,
        self.meta,
        config.evaluation,
        eval_original_canvas(config.dataset),
        mesh,
        variables_shardings,
      )
    self._predict = _PREDICT_CACHE[key]

  def _to_device(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return pipeline.global_batch(local, self._mesh, jax.P(sharding.BATCH_AXES))

  def __call__(self, variables, step: int, writer=None) -> dict[str, float]:
    """Metrics of `variables` (percent), with overlays of the first few images."""
    overlays = _OverlayCollector(self.meta, self._config.evaluation.num_overlays)
    with jax.set_mesh(self._mesh):
      results = self._evaluator.evaluate(
        self._predict, variables, self.loader, self.meta, self._to_device, on_batch=overlays
      )
    if writer is not None:
      writer.write_scalars(step, {f"eval_{k}": v for k, v in results.items()})
    if overlays.images:  # only process 0 collects them
      directory = os.path.join(self._workdir, "overlays", f"step_{step}")
      from mpformer_jax.evaluation.overlays import save_png

      for index, picture in overlays.images:
        save_png(os.path.join(directory, f"{index:05d}.png"), picture)
      pictures = [p for _, p in overlays.images]
      if writer is not None and len({p.shape for p in pictures}) == 1:
        writer.write_images(step, {"overlays": np.stack(pictures)})
      results["overlays_dir"] = directory
    return results


class _OverlayCollector:
  """Keeps `[image | ground truth | prediction]` pictures of the first `limit` real images."""

  def __init__(self, meta, limit: int):
    self.meta, self.limit = meta, limit
    self.images: list[tuple[int, np.ndarray]] = []

  def __call__(self, batch, outputs) -> None:
    from mpformer_jax.data import transforms
    from mpformer_jax.evaluation import evaluator, overlays, postprocess

    k = self.meta.num_classes
    for i in np.flatnonzero(batch["is_real"]):
      if len(self.images) >= self.limit or jax.process_index() != 0:
        return
      rh, rw = (int(v) for v in batch["resized_size"][i])
      h, w = (int(v) for v in batch["image_size"][i])  # ground truth and predictions
      image = overlays.denormalize(batch["image"][i, :rh, :rw])
      if (rh, rw) != (h, w):
        image = transforms.resize_image(image, (h, w))
      gt_map = batch["panoptic"][i, :h, :w]
      segments = evaluator.gt_segments(batch, i, self.meta)
      gt = overlays.overlay(image, gt_map, {s["id"]: s["label"] for s in segments}, k)
      if "panoptic" in outputs:
        p = outputs["panoptic"]
        pred_map, infos = postprocess.panoptic_segments_info(
          p["segment_map"][i],
          p["segment_labels"][i],
          p["segment_scores"][i],
          self.meta.label_isthing,
          image_size=(h, w),
        )
        labels = {s["id"]: s["label"] for s in infos}
      else:  # semantic (and instance, shown by its semantic map)
        pred_map = outputs["semantic"][i, :h, :w] + 1
        labels = {c + 1: c for c in range(k)}
      pred = overlays.overlay(image, pred_map, labels, k)
      self.images.append((int(batch["index"][i]), overlays.side_by_side(image, gt, pred)))
