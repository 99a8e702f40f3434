"""Sine positional encoding of a feature map (DETR / Mask2Former `PositionEmbeddingSine`)."""

from __future__ import annotations

import functools
import math

import numpy as np


@functools.lru_cache(maxsize=64)
def sine_position_encoding(
  height: int,
  width: int,
  num_pos_feats: int,
  temperature: float = 10000.0,
  normalize: bool = True,
  scale: float = 2 * math.pi,
) -> np.ndarray:
  """Positional encoding of an `height x width` grid, `PositionEmbeddingSine(normalize=True)`.

  Row and column indices count from 1; with `normalize` they are divided by the last index plus
  1e-6 and multiplied by `scale`. Channel `2k` is `sin(pos / t_k)` and `2k + 1` is
  `cos(pos / t_k)` with `t_k = temperature ** (2 * k / num_pos_feats)`; the output is the y part
  followed by the x part. Computed in float32 like the reference (no padding mask: the reference
  passes none to the encoder or decoder).

  Shapes are static under jit, so this runs in numpy at trace time and enters the graph as a
  constant.

  Args:
    height: rows of the feature map.
    width: columns of the feature map.
    num_pos_feats: channels per axis; the output has `2 * num_pos_feats` channels.
    temperature: frequency base.
    normalize: divide positions by the extent (Mask2Former always does).
    scale: multiplier applied after normalising.

  Returns:
    float32 `[height, width, 2 * num_pos_feats]`.
  """
  y_embed = np.arange(1, height + 1, dtype=np.float32)[:, None] * np.ones((1, width), np.float32)
  x_embed = np.ones((height, 1), np.float32) * np.arange(1, width + 1, dtype=np.float32)[None, :]
  if normalize:
    eps = np.float32(1e-6)
    y_embed = y_embed / (y_embed[-1:, :] + eps) * np.float32(scale)
    x_embed = x_embed / (x_embed[:, -1:] + eps) * np.float32(scale)
  dim_t = np.arange(num_pos_feats, dtype=np.float32)
  dim_t = np.float32(temperature) ** (2 * np.floor(dim_t / 2) / np.float32(num_pos_feats))
  dim_t = dim_t.astype(np.float32)
  pos_x = x_embed[:, :, None] / dim_t
  pos_y = y_embed[:, :, None] / dim_t
  # Interleave sin (even channels) and cos (odd channels).
  pos_x = np.stack((np.sin(pos_x[:, :, 0::2]), np.cos(pos_x[:, :, 1::2])), axis=3).reshape(
    height, width, -1
  )
  pos_y = np.stack((np.sin(pos_y[:, :, 0::2]), np.cos(pos_y[:, :, 1::2])), axis=3).reshape(
    height, width, -1
  )
  out = np.concatenate((pos_y, pos_x), axis=2).astype(np.float32)
  out.setflags(write=False)
  return out
