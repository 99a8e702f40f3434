"""Image/id-map augmentation and normalisation in numpy (PIL for bilinear resizing).

Two training augmentations, following Mask2Former's dataset mappers (detectron2 semantics):

- `train_transform` ("lsj", COCO's large-scale jitter): horizontal flip, resize so the image
  fits in `scale * crop_size` (scale uniform in `[min_scale, max_scale]`), random crop to
  `crop_size`, pad to `crop_size`.
- `short_side_transform` ("short_side", ADE20K / Cityscapes): `ResizeShortestEdge` to a random
  choice of short sides, `RandomCrop_CategoryAreaConstraint`, SSD colour jitter
  (`data.color_jitter`), horizontal flip, pad to `crop_size`.

Evaluation (`eval_transform`, `inference_transform`) either applies the reference's test
resize (`ResizeShortestEdge` to one short side) or, without one, only shrinks images larger
than the canvas; then it pads to a fixed canvas and records the content size, needed to crop
predictions back.

Images are resized bilinearly and id maps by nearest neighbour (ids must never blend). Padding is
0 in both: the mean colour after normalisation, and void in the id map.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mpformer_jax.data import color_jitter as jitter_lib

# detectron2's ImageNet RGB statistics (cfg.MODEL.PIXEL_MEAN / PIXEL_STD), on 0..255 pixels.
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)
# `RandomCrop_CategoryAreaConstraint` tries this many windows before it settles for the last.
CROP_TRIES = 10


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


def shortest_edge_size(size: tuple[int, int], short_side: int, max_size: int) -> tuple[int, int]:
  """detectron2's `ResizeShortestEdge.get_output_shape`: the `(h, w)` an image is resized to.

  The short side becomes `short_side`; if the long side would then exceed `max_size`, both
  shrink so it equals `max_size`. Sides round with `int(x + 0.5)`, as the reference does.

  Args:
    size: the image's `(H, W)`.
    short_side: target length of the shorter side.
    max_size: longest allowed side.
  """
  in_h, in_w = (int(v) for v in size)
  scale = short_side * 1.0 / min(in_h, in_w)
  if in_h < in_w:
    new_h, new_w = short_side * 1.0, scale * in_w
  else:
    new_h, new_w = scale * in_h, short_side * 1.0
  if max(new_h, new_w) > max_size:
    scale = max_size * 1.0 / max(new_h, new_w)
    new_h, new_w = new_h * scale, new_w * scale
  return int(new_h + 0.5), int(new_w + 0.5)


def category_map(
  pan_ids: np.ndarray, segment_ids: np.ndarray, category_ids: np.ndarray, ignore_label: int
) -> np.ndarray:
  """int32 `[H, W]` category id of every pixel of a panoptic id map `[H, W]`.

  This is the semantic label map the reference's crop constraint counts. Crowd segments keep
  their category (they are that class's pixels in the reference's semantic maps); void (0) and
  ids missing from `segment_ids` become `ignore_label`.

  Args:
    pan_ids: int `[H, W]` panoptic segment ids.
    segment_ids: int `[S]` the listed segment ids.
    category_ids: int `[S]` their category ids.
    ignore_label: the label of pixels without a listed segment.
  """
  segment_ids = np.asarray(segment_ids, np.int64).reshape(-1)
  category_ids = np.asarray(category_ids, np.int64).reshape(-1)
  if not len(segment_ids):
    return np.full(pan_ids.shape, ignore_label, np.int32)
  order = np.argsort(segment_ids)
  sorted_ids = segment_ids[order]
  position = np.minimum(np.searchsorted(sorted_ids, pan_ids), len(sorted_ids) - 1)
  listed = sorted_ids[position] == pan_ids
  return np.where(listed, category_ids[order][position], ignore_label).astype(np.int32)


def crop_window(
  size: tuple[int, int],
  crop_size: tuple[int, int],
  fractions: np.ndarray,
  categories: np.ndarray | None = None,
  single_category_max_area: float = 1.0,
  ignore_label: int = 255,
) -> tuple[int, int, int, int]:
  """detectron2's `RandomCrop_CategoryAreaConstraint` ("absolute" crop type) with given draws.

  The window is `crop_size` clipped to the image. With `single_category_max_area < 1`, up to
  `len(fractions)` (the reference: 10) windows are tried in order; the first that holds more
  than one category, and whose largest category covers less than `single_category_max_area` of
  its non-ignored pixels, is taken, and if none does the last one tried is. With 1.0 the first
  window is taken.

  Args:
    size: the image's `(H, W)`.
    crop_size: the crop's `(h, w)`.
    fractions: float `[tries, 2]` in `[0, 1)`: each try's top and left offset as a fraction of
      the `H - h + 1` (resp. `W - w + 1`) possible offsets, i.e. `randint(H - h + 1)`.
    categories: int `[H, W]` category map (`category_map`); needed when the constraint is on.
    single_category_max_area: the constraint, in `(0, 1]`.
    ignore_label: the category map's void value, excluded from the counts.

  Returns:
    `(top, left, h, w)` of the window.
  """
  in_h, in_w = (int(v) for v in size)
  crop_h, crop_w = min(crop_size[0], in_h), min(crop_size[1], in_w)

  def offsets(fraction):
    top = min(int(fraction[0] * (in_h - crop_h + 1)), in_h - crop_h)
    left = min(int(fraction[1] * (in_w - crop_w + 1)), in_w - crop_w)
    return top, left

  if single_category_max_area >= 1.0:
    return (*offsets(fractions[0]), crop_h, crop_w)
  if categories is None:
    raise ValueError("crop_window: the category-area constraint needs a category map")
  for fraction in fractions:
    top, left = offsets(fraction)
    window = categories[top : top + crop_h, left : left + crop_w]
    labels, counts = np.unique(window, return_counts=True)
    counts = counts[labels != ignore_label]
    if len(counts) > 1 and counts.max() < counts.sum() * single_category_max_area:
      break
  return top, left, crop_h, crop_w


def short_side_transform(
  image: np.ndarray,
  pan_ids: np.ndarray,
  rng: np.random.Generator,
  crop_size: tuple[int, int],
  sizes: tuple[int, ...],
  max_size: int,
  flip: bool,
  color_jitter: bool = False,
  single_category_max_area: float = 1.0,
  categories: np.ndarray | None = None,
  ignore_label: int = 255,
) -> tuple[np.ndarray, np.ndarray]:
  """Mask2Former's ADE20K / Cityscapes training augmentation of one example.

  In the reference's order: `ResizeShortestEdge(sizes, max_size, "choice")`,
  `RandomCrop_CategoryAreaConstraint(crop_size)`, `ColorAugSSDTransform` (if `color_jitter`),
  `RandomFlip` (if `flip`), then padding to `crop_size` (the reference's mapper pads to its
  size divisibility, the crop size).

  Args:
    image: uint8 `[H, W, 3]` RGB.
    pan_ids: int `[H, W]` panoptic id map.
    rng: the example's generator (`example_rng`).
    crop_size: output `(h, w)`.
    sizes: short-side lengths to choose from, uniformly.
    max_size: longest side after the resize.
    flip: whether to flip horizontally with probability 0.5.
    color_jitter: whether to apply the SSD colour jitter.
    single_category_max_area: the crop's category-area constraint (1.0: none).
    categories: int `[H, W]` category map of `pan_ids` (`category_map`); needed only when
      `single_category_max_area < 1`.
    ignore_label: the void value of `categories`.

  Returns:
    float32 `[h, w, 3]` normalised image and int32 `[h, w]` id map (padding is 0 in both).
  """
  # Draw every number up front, so the stream does not depend on which branches run.
  short_side = sizes[int(rng.integers(len(sizes)))]
  fractions = rng.random((CROP_TRIES, 2))
  do_flip = rng.random() < 0.5
  jitter = jitter_lib.draw_color_jitter(rng)
  size = shortest_edge_size(pan_ids.shape, short_side, max_size)
  image = resize_image(np.ascontiguousarray(image), size)
  pan_ids = resize_ids(pan_ids, size)
  if single_category_max_area < 1.0 and categories is not None:
    categories = resize_ids(categories, size)  # the same nearest sampling as `pan_ids`
  top, left, crop_h, crop_w = crop_window(
    size, crop_size, fractions, categories, single_category_max_area, ignore_label
  )
  image = image[top : top + crop_h, left : left + crop_w]
  pan_ids = pan_ids[top : top + crop_h, left : left + crop_w]
  if color_jitter:
    image = jitter_lib.apply_color_jitter(image, jitter)
  if flip and do_flip:
    image, pan_ids = image[:, ::-1], pan_ids[:, ::-1]
  return pad_to(normalize(image), crop_size), pad_to(pan_ids.astype(np.int32), crop_size)


def content_size(
  size: tuple[int, int],
  canvas: tuple[int, int],
  short_side: int = 0,
  max_size: int = 0,
  name: str = "image",
) -> tuple[int, int]:
  """`(h, w)` an evaluation image of `size` takes inside the `canvas`.

  With `short_side > 0` this is the reference's test resize (`shortest_edge_size`), which must
  fit the canvas; with 0 the image keeps its size unless it must shrink to fit (`fit_size`).

  Raises:
    ValueError: naming `name`, when the test resize does not fit the canvas.
  """
  if not short_side:
    return fit_size(size, canvas)
  resized = shortest_edge_size(size, short_side, max_size)
  if resized[0] > canvas[0] or resized[1] > canvas[1]:
    raise ValueError(
      f"{name}: its test resize (short side {short_side}, long side at most {max_size}) "
      f"takes {tuple(size)} to {resized}, which does not fit dataset.eval_size "
      f"{tuple(canvas)}; enlarge dataset.eval_size"
    )
  return resized


def eval_transform(
  image: np.ndarray,
  pan_ids: np.ndarray,
  eval_size: tuple[int, int],
  short_side: int = 0,
  max_size: int = 0,
  name: str = "image",
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
  """Deterministic resize and pad of one evaluation example.

  Args:
    image: uint8 `[H, W, 3]` RGB.
    pan_ids: int `[H, W]` panoptic id map.
    eval_size: output `(h, w)`.
    short_side, max_size: the test resize (`content_size`); 0: only shrink to fit.
    name: how errors name the example.

  Returns:
    float32 `[h, w, 3]` normalised image, int32 `[h, w]` id map, and the `(h', w')` size of the
    image content inside the padded canvas.
  """
  size = content_size(pan_ids.shape, eval_size, short_side, max_size, name)
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
  image: np.ndarray,
  canvas: tuple[int, int],
  short_side: int = 0,
  max_size: int = 0,
  name: str = "image",
) -> tuple[np.ndarray, tuple[int, int]]:
  """An image without ground truth, prepared like `eval_transform` prepares evaluation images.

  Args:
    image: uint8 `[H, W, 3]` RGB.
    canvas: output `(h, w)`.
    short_side, max_size: the test resize (`content_size`); 0: only shrink to fit.
    name: how errors name the image.

  Returns:
    float32 `[h, w, 3]` normalised padded image and the `(h', w')` of its content.
  """
  size = content_size(image.shape[:2], canvas, short_side, max_size, name)
  return pad_to(normalize(resize_image(image, size)), canvas), size
