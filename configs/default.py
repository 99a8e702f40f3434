"""Default configuration: MP-Former with a ResNet-50 backbone (the paper's defaults).

Usage: `python main.py --config configs/default.py --workdir DIR`.
"""

import ml_collections

from mpformer_jax import config_lib


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # MP-Former removes the learnable query positional embedding and adds the mask pilot.
  config.model = config_lib.mp_former_config(num_classes=133, backbone="resnet50")
  return config
