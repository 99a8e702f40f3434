"""Default configuration: MP-Former with a ResNet-50 backbone (the paper's defaults).

Usage: `python main.py --config configs/default.py --workdir DIR`.
"""

import ml_collections

from mpformer_jax import config_lib


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = config_lib.model_config(num_classes=133, backbone="resnet50")
  # MP-Former removes the learnable query positional embedding (spec section 2.4).
  config.model.decoder.query_pos_embed = False
  return config
