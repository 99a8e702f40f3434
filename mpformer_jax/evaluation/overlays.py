"""Pictures for people: segmentations blended over their images (numpy + PIL only)."""

from __future__ import annotations

import colorsys
import os

import numpy as np

from mpformer_jax.data.transforms import PIXEL_MEAN, PIXEL_STD


def denormalize(image: np.ndarray) -> np.ndarray:
  """uint8 `[H, W, 3]` RGB of a normalised float32 `[H, W, 3]` network input."""
  return np.clip(image * PIXEL_STD + PIXEL_MEAN, 0, 255).astype(np.uint8)


def _segment_colour(label: int, instance: int, num_labels: int) -> np.ndarray:
  """A colour per class (evenly spread hues), varied per instance so neighbours differ."""
  hue = (label / max(num_labels, 1) + 0.07 * (instance % 5)) % 1.0
  value = 1.0 - 0.12 * (instance % 3)
  return np.array(colorsys.hsv_to_rgb(hue, 0.75, value)) * 255


def colorize(segment_map: np.ndarray, labels_of_ids: dict[int, int], num_labels: int):
  """uint8 `[H, W, 3]` colours of a segment-id map (0 = void: black).

  Args:
    segment_map: int `[H, W]` segment ids.
    labels_of_ids: segment id -> class label (ids missing here are drawn as void).
    num_labels: number of classes (spreads the hues).
  """
  out = np.zeros((*segment_map.shape, 3), np.uint8)
  for n, (segment_id, label) in enumerate(sorted(labels_of_ids.items())):
    out[segment_map == segment_id] = _segment_colour(label, n, num_labels).astype(np.uint8)
  return out


def _boundaries(segment_map: np.ndarray) -> np.ndarray:
  edge = np.zeros(segment_map.shape, bool)
  edge[1:] |= segment_map[1:] != segment_map[:-1]
  edge[:, 1:] |= segment_map[:, 1:] != segment_map[:, :-1]
  return edge


def overlay(image: np.ndarray, segment_map: np.ndarray, labels_of_ids, num_labels, alpha=0.55):
  """uint8 `[H, W, 3]`: the segmentation blended over `image`, segment borders in white."""
  colours = colorize(segment_map, labels_of_ids, num_labels).astype(np.float32)
  labelled = (segment_map > 0)[..., None]
  blended = np.where(labelled, (1 - alpha) * image + alpha * colours, image)
  blended[_boundaries(segment_map)] = 255
  return blended.astype(np.uint8)


def side_by_side(*panels: np.ndarray, gap: int = 4) -> np.ndarray:
  """Panels `[H, W, 3]` next to each other with a white gap."""
  h = max(p.shape[0] for p in panels)
  pieces = []
  for i, p in enumerate(panels):
    padded = np.full((h, p.shape[1], 3), 255, np.uint8)
    padded[: p.shape[0]] = p
    pieces.append(padded)
    if i < len(panels) - 1:
      pieces.append(np.full((h, gap, 3), 255, np.uint8))
  return np.concatenate(pieces, axis=1)


def save_png(path: str, image: np.ndarray) -> None:
  from PIL import Image

  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(image).save(path)
