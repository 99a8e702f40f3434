"""Image/id-map augmentation and normalisation in numpy (PIL for bilinear resizing).

Training follows Mask2Former's large-scale jitter: horizontal flip, resize so the image fits in
`scale * crop_size` (scale uniform in `[min_scale, max_scale]`), random crop to `crop_size`, pad
to `crop_size`. Evaluation only pads to a fixed `eval_size` (resizing down first if the image is
larger) and records the sizes needed to crop predictions back.

Images are resized bilinearly and id maps by nearest neighbour (ids must never blend). Padding is
0 in both: the mean colour after normalisation, and void in the id map.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# detectron2's ImageNet RGB statistics (cfg.MODEL.PIXEL_MEAN / PIXEL_STD), on 0..255 pixels.
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The augmentation generator of one example in one epoch.

  Seeding by `(seed, epoch, index)` makes an example's augmentation independent of the order in
  which workers or processes produce examples.
  """
  return np.random.default_rng([seed, epoch, index])


def normalize(image: np.ndarray) -> np.ndarray:
  """float32 `[H, W, 3]` `(image - mean) / std` of a uint8 RGB `[H, W, 3]` image."""
  return (image.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 `[h, w, 3]` bilinear resize of uint8 `[H, W, 3]` to `size = (h, w)`."""
  if image.shape[:2] == tuple(size):
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def resize_ids(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`[h, w]` nearest-neighbour resize of an id map `[H, W]`, sampling at pixel centres."""
  in_h, in_w = ids.shape
  rows = np.minimum(((np.arange(size[0]) + 0.5) * in_h / size[0]).astype(np.int64), in_h - 1)
  cols = np.minimum(((np.arange(size[1]) + 0.5) * in_w / size[1]).astype(np.int64), in_w - 1)
  return ids[rows[:, None], cols[None, :]]


def pad_to(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Zero-pad `[h, w, ...]` at the bottom and right to `[size[0], size[1], ...]`."""
  pad_h, pad_w = size[0] - array.shape[0], size[1] - array.shape[1]
  if pad_h < 0 or pad_w < 0:
    raise ValueError(f"cannot pad {array.shape[:2]} to the smaller size {tuple(size)}")
  return np.pad(array, [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2))


def train_transform(
  image: np.ndarray,
  pan_ids: np.ndarray,
  rng: np.random.Generator,
  crop_size: tuple[int, int],
  min_scale: float,
  max_scale: float,
  flip: bool,
) -> tuple[np.ndarray, np.ndarray]:
  """Random flip, scale jitter, crop and pad of one training example.

  Args:
    image: uint8 `[H, W, 3]` RGB.
    pan_ids: int `[H, W]` panoptic id map.
    rng: the example's generator (`example_rng`).
    crop_size: output `(h, w)`.
    min_scale: smallest scale factor relative to fitting the image into `crop_size`.
    max_scale: largest scale factor.
    flip: whether to flip horizontally with probability 0.5.

  Returns:
    float32 `[h, w, 3]` normalised image and int32 `[h, w]` id map (padding is 0 in both).
  """
  # Draw every number up front, so the stream does not depend on which branches run.
  do_flip = rng.random() < 0.5
  scale = rng.uniform(min_scale, max_scale)
  offset_fraction = rng.random(2)
  if flip and do_flip:
    image, pan_ids = image[:, ::-1], pan_ids[:, ::-1]
  in_h, in_w = pan_ids.shape
  crop_h, crop_w = crop_size
  # detectron2's ResizeScale: fit the image into the scaled target, keeping its aspect ratio.
  factor = min(scale * crop_h / in_h, scale * crop_w / in_w)
  size = (max(int(round(in_h * factor)), 1), max(int(round(in_w * factor)), 1))
  image = resize_image(np.ascontiguousarray(image), size)
  pan_ids = resize_ids(pan_ids, size)
  # FixedSizeCrop: a random window where the image is larger than the crop, then padding.
  top = int(offset_fraction[0] * (max(size[0] - crop_h, 0) + 1))
  left = int(offset_fraction[1] * (max(size[1] - crop_w, 0) + 1))
  image = image[top : top + crop_h, left : left + crop_w]
  pan_ids = pan_ids[top : top + crop_h, left : left + crop_w]
  return pad_to(normalize(image), crop_size), pad_to(pan_ids.astype(np.int32), crop_size)


def eval_transform(
  image: np.ndarray, pan_ids: np.ndarray, eval_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
  """Deterministic resize-to-fit (only if larger) and pad of one evaluation example.

  Args:
    image: uint8 `[H, W, 3]` RGB.
    pan_ids: int `[H, W]` panoptic id map.
    eval_size: output `(h, w)`.

  Returns:
    float32 `[h, w, 3]` normalised image, int32 `[h, w]` id map, and the `(h', w')` size of the
    image content inside the padded canvas (`(H, W)` unless the image had to shrink).
  """
  size = fit_size(pan_ids.shape, eval_size)
  if size != pan_ids.shape:
    image, pan_ids = resize_image(image, size), resize_ids(pan_ids, size)
  image = pad_to(normalize(image), eval_size)
  return image, pad_to(pan_ids.astype(np.int32), eval_size), size


def fit_size(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
  """`(h, w)` of an image of `size` shrunk (never enlarged) to fit `canvas`, aspect kept."""
  in_h, in_w = (int(v) for v in size)
  factor = min(canvas[0] / in_h, canvas[1] / in_w, 1.0)
  if factor >= 1.0:
    return in_h, in_w
  return (
    min(max(int(round(in_h * factor)), 1), canvas[0]),
    min(max(int(round(in_w * factor)), 1), canvas[1]),
  )


def inference_transform(
  image: np.ndarray, canvas: tuple[int, int]
) -> tuple[np.ndarray, tuple[int, int]]:
  """An image without ground truth, prepared like `eval_transform` prepares evaluation images.

  Returns:
    float32 `[h, w, 3]` normalised padded image and the `(h', w')` of its content.
  """
  size = fit_size(image.shape[:2], canvas)
  return pad_to(normalize(resize_image(image, size)), canvas), size
