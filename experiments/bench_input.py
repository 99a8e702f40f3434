"""Input-pipeline throughput at the paper's COCO and ADE20K settings, per loading worker.

Writes a small raw dataset in each official layout (COCO 2017 panoptic at 640 x 480, COCO's
typical size; ADE20K SceneParsing at 683 x 512, its typical size), prepares it with
`mpformer_jax.data.prepare`, then times the training loader of the paper configs:

- `coco_panoptic_r50`: large-scale jitter to a 1024 x 1024 crop, flip, panoptic targets;
- `ade20k_semantic_r50`: short side in 256..1024, 512 x 512 crop, SSD colour jitter, flip.

The loader runs in the main process (`worker_count=0`), so the figure is what one grain worker
(one host core) delivers: decode, augmentation, targets and batching included. A host that must
feed `R` images/s needs about `R / figure` worker cores.

Usage: .venv/bin/python experiments/bench_input.py [--images 32] [--batches 8] [--batch 8]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpformer_jax.data import coco_categories, panoptic_png, pipeline  # noqa: E402
from mpformer_jax.data import prepare as prepare_lib  # noqa: E402


def _partition(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
  """int `[h, w]` index of the nearest of `cells` random seeds (a Voronoi partition)."""
  seeds = rng.uniform((0, 0), (h, w), (cells, 2))
  yy, xx = np.mgrid[0:h, 0:w]
  best = np.zeros((h, w), np.int64)
  best_d = np.full((h, w), np.inf)
  for i, (sy, sx) in enumerate(seeds):
    d = (yy - sy) ** 2 + (xx - sx) ** 2
    closer = d < best_d
    best[closer], best_d[closer] = i, d[closer]
  return best


def _photo(rng: np.random.Generator, cells: np.ndarray) -> np.ndarray:
  """uint8 `[h, w, 3]`: a colour per cell plus noise, so JPEG has texture to decode."""
  colours = rng.integers(0, 256, (cells.max() + 1, 3))
  noise = rng.normal(0, 12, (*cells.shape, 3))
  return np.clip(colours[cells] + noise, 0, 255).astype(np.uint8)


def write_coco_panoptic(raw: str, count: int, size=(480, 640)) -> None:
  """`count` val2017 and train2017 images with panoptic PNGs and JSON (the official layout)."""
  rng = np.random.default_rng(0)
  categories = coco_categories.PANOPTIC_CATEGORIES
  for split in ("train2017", "val2017"):
    images, annotations = [], []
    os.makedirs(os.path.join(raw, split), exist_ok=True)
    os.makedirs(os.path.join(raw, "annotations", f"panoptic_{split}"), exist_ok=True)
    for i in range(count):
      cells = _partition(rng, *size, cells=int(rng.integers(6, 20)))
      name = f"{i + 1:012d}"
      Image.fromarray(_photo(rng, cells)).save(os.path.join(raw, split, name + ".jpg"), quality=90)
      ids = cells + 1
      Image.fromarray(panoptic_png.id_to_rgb(ids)).save(
        os.path.join(raw, "annotations", f"panoptic_{split}", name + ".png")
      )
      segments = []
      for seg_id in np.unique(ids):
        category = categories[int(rng.integers(len(categories)))]
        ys, xs = np.nonzero(ids == seg_id)
        segments.append(
          {
            "id": int(seg_id),
            "category_id": category["id"],
            "iscrowd": 0,
            "area": len(ys),
            "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)],
          }
        )
      images.append({"id": i + 1, "file_name": name + ".jpg", "height": size[0], "width": size[1]})
      annotations.append({"image_id": i + 1, "file_name": name + ".png", "segments_info": segments})
    with open(os.path.join(raw, "annotations", f"panoptic_{split}.json"), "w") as f:
      json.dump(
        {
          "images": images,
          "annotations": annotations,
          "categories": [{**c, "isthing": int(c["isthing"])} for c in categories],
        },
        f,
      )


def write_ade20k(raw: str, count: int, size=(512, 683)) -> None:
  """`count` training and validation images with their 150-class label PNGs."""
  rng = np.random.default_rng(1)
  root = os.path.join(raw, "ADEChallengeData2016")
  for split, prefix in (("training", "train"), ("validation", "val")):
    os.makedirs(os.path.join(root, "images", split), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
    for i in range(count):
      cells = _partition(rng, *size, cells=int(rng.integers(6, 20)))
      labels = rng.integers(0, 151, cells.max() + 1)[cells].astype(np.uint8)  # 0 = "other"
      name = f"ADE_{prefix}_{i + 1:08d}"
      Image.fromarray(_photo(rng, cells)).save(
        os.path.join(root, "images", split, name + ".jpg"), quality=90
      )
      Image.fromarray(labels).save(os.path.join(root, "annotations", split, name + ".png"))


def time_loader(dataset, batch: int, batches: int) -> dict[str, float]:
  """Images/s of the training loader in this process, after one warm-up batch."""
  loader = iter(pipeline.create_train_loader(dataset, batch, 0, 0, 1, worker_count=0))
  next(loader)
  start = time.perf_counter()
  for _ in range(batches):
    next(loader)
  seconds = time.perf_counter() - start
  return {
    "images_per_s": round(batch * batches / seconds, 2),
    "ms_per_image": round(1e3 * seconds / (batch * batches), 1),
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=32, help="raw images per split")
  parser.add_argument("--batches", type=int, default=8, help="timed batches per setting")
  parser.add_argument("--batch", type=int, default=8)
  args = parser.parse_args()

  results = {
    "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
    "workers": 1,
  }
  with tempfile.TemporaryDirectory() as tmp:
    raw, data_dir = os.path.join(tmp, "raw"), os.path.join(tmp, "data")
    settings = (
      ("coco_panoptic", "coco_panoptic_r50", write_coco_panoptic, (480, 640)),
      ("ade20k_semantic", "ade20k_semantic_r50", write_ade20k, (512, 683)),
    )
    for name, config_name, write, size in settings:
      write(raw, args.images)
      start = time.perf_counter()
      prepare_lib.prepare(name, raw, data_dir)
      prepare_s = time.perf_counter() - start
      dataset = importlib.import_module(f"configs.{config_name}").get_config().dataset
      dataset.data_dir = data_dir
      entry = time_loader(dataset, args.batch, args.batches)
      entry.update(
        {
          "raw_image_size": list(size),
          "crop_size": list(dataset.crop_size),
          "augmentation": dataset.augmentation,
          "prepare_s_per_image": round(prepare_s / (2 * args.images), 3),
        }
      )
      results[config_name] = entry
      print(json.dumps({config_name: entry}), file=sys.stderr, flush=True)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
