"""COCO panoptic PNG encoding: segment id = R + 256 * G + 256**2 * B."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
  """uint8 `[..., 3]` COCO colour of int ids `[...]` in `[0, 2**24)`."""
  ids = np.asarray(ids, np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= 2**24):
    raise ValueError("panoptic segment ids must lie in [0, 2**24) to fit in an RGB PNG")
  return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
  """int32 `[...]` segment ids of COCO colours uint8 `[..., 3]`."""
  rgb = np.asarray(rgb).astype(np.int32)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def encode_png(image: np.ndarray) -> bytes:
  """Lossless PNG bytes of a uint8 `[H, W, 3]` image (TFDS cannot encode arrays without TF)."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()
