"""Shared test utilities."""

from __future__ import annotations

import numpy as np

from mpformer_jax import config_lib
from mpformer_jax.models.random_variables import random_variables  # noqa: F401 (re-export)


def tiny_model_config(num_classes: int = 5, backbone: str = "resnet", num_layers: int = 3):
  """A small network that compiles and runs in seconds on a CPU."""
  config = config_lib.model_config(num_classes=num_classes)
  if backbone == "resnet":
    config.backbone.resnet.depths = (1, 1, 1, 1)
    config.backbone.resnet.stem_width = 16
    config.backbone.resnet.width = 8
  else:
    config.backbone = config_lib.swin_config("tiny", drop_path_rate=0.0)
    s = config.backbone.swin
    s.embed_dim, s.depths, s.num_heads, s.window_size = 16, (1, 1, 1, 1), (1, 2, 2, 4), 2
  pd = config.pixel_decoder
  pd.conv_dim, pd.mask_dim, pd.num_layers, pd.num_heads, pd.ffn_dim = 32, 32, 1, 2, 64
  dec = config.decoder
  dec.hidden_dim, dec.num_queries, dec.num_heads, dec.ffn_dim = 32, 6, 2, 64
  dec.num_layers = num_layers
  return config


def random_targets(
  seed: int, batch: int, size: tuple[int, int], max_gt: int, num_classes: int, counts=None
):
  """Ground truth of random overlapping rectangles painted into an id map (later ones on top).

  Args:
    seed: numpy seed.
    batch: images.
    size: (H, W).
    max_gt: slots per image.
    num_classes: K.
    counts: segments per image (default: random in [1, max_gt]).

  Returns:
    `mpformer_jax.targets.Targets` with numpy arrays; every listed segment keeps >= 1 pixel.
  """
  from mpformer_jax.targets import Targets

  rng = np.random.default_rng(seed)
  h, w = size
  seg = np.zeros((batch, h, w), np.int32)
  ids = np.zeros((batch, max_gt), np.int32)
  labels = np.zeros((batch, max_gt), np.int32)
  valid = np.zeros((batch, max_gt), bool)
  for b in range(batch):
    n = rng.integers(1, max_gt + 1) if counts is None else counts[b]
    for j in range(n):
      y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
      y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
      seg[b, y0:y1, x0:x1] = j + 1
    present = [j for j in range(n) if (seg[b] == j + 1).any()]
    for slot, j in enumerate(present):
      ids[b, slot] = j + 1
      labels[b, slot] = rng.integers(0, num_classes)
      valid[b, slot] = True
  return Targets(segment_ids=seg, ids=ids, labels=labels, valid=valid)
