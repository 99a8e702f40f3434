"""The paper's defaults: MP-Former, ResNet-50, the reference's objective, optimiser and schedule.

Every number besides the dataset is the reference's (spec sections 1-4): 100 queries, 9 decoder
layers, 12544 points, AdamW 1e-4 with the backbone at x0.1, clipping 0.01, batch 16, poly
schedule. Until the real datasets land the data is the embedded `synthetic_shapes` set, so the
class count is its 8; task configs override `dataset` and `model.num_classes`.

Usage: `python main.py --config configs/default.py --workdir DIR`.
"""

import ml_collections

from mpformer_jax import config_lib
from mpformer_jax.data import pipeline


def get_config() -> ml_collections.ConfigDict:
  dataset = pipeline.default_dataset_config()
  # MP-Former removes the learnable query positional embedding and adds the mask pilot.
  model = config_lib.mp_former_config(num_classes=dataset.num_classes, backbone="resnet50")
  return config_lib.base_config(model, dataset)
