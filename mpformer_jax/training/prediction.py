"""`--mode predict`: a trained checkpoint applied to a directory (or glob) of image files.

Images are prepared like evaluation images (the test resize, or shrunk to fit `dataset.eval_size`
if larger; padded), predicted in fixed-shape batches of `evaluation.batch_size` (the last one
padded, so the step compiles once), resized back to their original size on device as in
evaluation, and written by `evaluation.export.PredictionWriter`. An image larger than the
`dataset.eval_original_size` canvas is predicted at the largest size that fits it and its maps
are enlarged by nearest neighbour (counted in the result as `num_enlarged`).
"""

from __future__ import annotations

import glob
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from PIL import Image

from mpformer_jax.data import pipeline, transforms
from mpformer_jax.data.config import eval_original_canvas
from mpformer_jax.data.metadata import dataset_metadata
from mpformer_jax.training import sharding

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(input_path: str) -> list[str]:
  """The image files of a directory (non-recursive) or a glob pattern, sorted.

  Raises:
    FileNotFoundError: when nothing matches.
  """
  if os.path.isdir(input_path):
    paths = [
      os.path.join(input_path, f)
      for f in os.listdir(input_path)
      if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(input_path, f))
    ]
  else:
    paths = [p for p in glob.glob(input_path) if os.path.isfile(p)]
  if not paths:
    raise FileNotFoundError(
      f"--input {input_path!r}: no image files there (a directory of "
      f"{'/'.join(IMAGE_EXTENSIONS)} files, or a glob pattern)"
    )
  return sorted(paths)


def load_image(path: str) -> np.ndarray:
  """uint8 `[H, W, 3]` RGB (grey, palette and alpha images are converted).

  Raises:
    ValueError: naming the file, when it is not a readable image.
  """
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, ValueError) as e:
    raise ValueError(f"--input: cannot read {path!r} as an image: {e}") from e


def predict_files(config, workdir: str, input_path: str, output_dir: str) -> dict[str, Any]:
  """Predicts every image of `input_path` with the checkpoint of `workdir`, into `output_dir`.

  The checkpoint is `config.evaluation.checkpoint_step` (-1: the newest). One process only.

  Returns:
    `{"step", "num_images", "num_enlarged", <file>: path, ...}` (see
    `PredictionWriter.close`).
  """
  from mpformer_jax.evaluation import evaluator
  from mpformer_jax.evaluation.export import PredictionWriter, unique_names
  from mpformer_jax.training.evaluation_loop import jit_predict
  from mpformer_jax.training.trainer import restore_for_inference

  if jax.process_count() > 1:
    raise NotImplementedError("--mode predict runs in one process")
  paths = list_images(input_path)
  meta = dataset_metadata(config.dataset)
  canvas = tuple(config.dataset.eval_size)
  output_canvas = eval_original_canvas(config.dataset)
  batch_size = int(config.evaluation.batch_size)
  model, mesh, variables, variables_shardings, step = restore_for_inference(config, workdir)
  if batch_size % mesh.devices.size:
    raise ValueError(
      f"evaluation.batch_size = {batch_size} must be a multiple of the {mesh.devices.size} devices"
    )
  predict = jit_predict(
    model, meta, config.evaluation, output_canvas, mesh, variables_shardings, with_confusion=False
  )
  num_enlarged = 0
  writer = PredictionWriter(output_dir, meta)
  names = unique_names(paths)
  logging.info("Predicting %d images of %s with step %d", len(paths), input_path, step)
  with jax.set_mesh(mesh):
    for start in range(0, len(paths), batch_size):
      chunk = list(range(start, min(start + batch_size, len(paths))))
      originals = [load_image(paths[i]) for i in chunk]
      inputs = np.zeros((batch_size, *canvas, 3), np.float32)
      sizes = np.zeros((batch_size, 2), np.int32)
      predicted = np.zeros((batch_size, 2), np.int32)
      for n, image in enumerate(originals):
        predicted[n] = transforms.fit_size(image.shape[:2], output_canvas)
        num_enlarged += tuple(predicted[n]) != image.shape[:2]
        inputs[n], sizes[n] = transforms.inference_transform(
          image,
          canvas,
          config.dataset.eval_short_side,
          config.dataset.eval_max_size,
          name=paths[chunk[n]],
        )
      local = {
        "image": inputs,
        "resized_size": sizes,
        "image_size": predicted,
        "semantic_gt": np.zeros((batch_size, *output_canvas), np.int32),  # unused
      }
      device = pipeline.global_batch(local, mesh, jax.P(sharding.BATCH_AXES))
      outputs = predict(variables, *(device[k] for k in evaluator.INPUT_KEYS))
      outputs = jax.tree.map(np.asarray, outputs)
      for n, i in enumerate(chunk):
        writer.add(
          names[i],
          paths[i],
          originals[n],
          jax.tree.map(lambda x, n=n: x[n], outputs),
          tuple(int(v) for v in predicted[n]),
        )
  if num_enlarged:
    logging.warning(
      "%d of %d images are larger than dataset.eval_original_size %s: their maps were "
      "predicted smaller and enlarged by nearest neighbour",
      num_enlarged,
      len(paths),
      output_canvas,
    )
  written = writer.close()
  logging.info("Wrote predictions of %d images to %s", written["num_images"], output_dir)
  return {"step": step, "num_enlarged": num_enlarged, **written}
