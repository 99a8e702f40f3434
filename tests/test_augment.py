"""The ADE20K / Cityscapes augmentation ("short_side"), SSD colour jitter and the test resize."""

from __future__ import annotations

import numpy as np
import pytest

from mpformer_jax.data import (
  color_jitter,
  dataset_metadata,
  default_dataset_config,
  panoptic_png,
  pipeline,
  sources,
  transforms,
)
from mpformer_jax.data.color_jitter import ColorJitter
from mpformer_jax.data.targets import panoptic_to_targets

IGNORE = 255
NO_JITTER = ColorJitter(None, True, None, None, None)

# ---------------------------------------------------------------------------------------------
# OpenCV's uint8 HSV.

# (B, G, R) -> (H, S, V) as cv2.cvtColor(COLOR_BGR2HSV) gives them, worked out by hand from its
# fixed-point formulas: S = (diff * round(255 * 2**12 / V) + 2**11) >> 12 and
# H = (h' * round(180 * 2**12 / (6 * diff)) + 2**11) >> 12, plus 180 if negative.
BGR_TO_HSV = [
  ((0, 0, 255), (0, 255, 255)),  # red
  ((0, 255, 0), (60, 255, 255)),  # green
  ((255, 0, 0), (120, 255, 255)),  # blue
  ((0, 255, 255), (30, 255, 255)),  # yellow
  ((255, 255, 0), (90, 255, 255)),  # cyan
  ((255, 0, 255), (150, 255, 255)),  # magenta
  ((128, 128, 128), (0, 0, 128)),  # grey: no saturation, hue 0
  ((0, 0, 0), (0, 0, 0)),
  ((255, 255, 255), (0, 0, 255)),
  ((50, 100, 200), (10, 191, 200)),  # S = 150 * 5222 + 2048 >> 12 = 191.7 -> 191
  ((30, 20, 10), (105, 170, 30)),  # blue is the maximum: 4 * diff + r - g = 70 -> 105
  ((100, 150, 200), (15, 127, 200)),  # S = 127.5 exactly, but the fixed point gives 127
  ((20, 0, 255), (178, 255, 255)),  # h' = -20 -> -2 -> wraps to 178
  ((1, 0, 255), (0, 255, 255)),  # h' = -1 -> (-482 + 2048) >> 12 = 0, no wrap
]

# (H, S, V) -> (B, G, R) as cv2.cvtColor(COLOR_HSV2BGR) gives them, in float32: H * (6 / 180)
# picks a sector, `tab = v, v (1 - s), v (1 - s f), v (1 - s (1 - f))`, then `x * 255` is
# truncated (OpenCV 4's vectorised loop) or rounded (its scalar loop).
HSV_TO_BGR = [
  # hsv, truncated, rounded
  ((0, 255, 255), (0, 0, 255), (0, 0, 255)),
  ((60, 255, 255), (0, 255, 0), (0, 255, 0)),  # 60 * 6/180 is exactly 2.0 in float32
  ((120, 255, 255), (255, 0, 0), (255, 0, 0)),
  # 90 * float32(6/180) = 3.0000002: f = 2.4e-7, so G = 255 (1 - f) = 254.99994.
  ((90, 255, 255), (255, 254, 0), (255, 255, 0)),
  # Sector 3, f = 1/3: G = 200 (1 - 0.502 / 3) = 166.54, R = 200 (1 - 0.502) = 99.61.
  ((100, 128, 200), (200, 166, 99), (200, 167, 100)),
  # Sector 0, f = 1/3: B = 200 (1 - 0.749) = 50.2, G = 200 (1 - 0.749 * 2/3) = 100.1.
  ((10, 191, 200), (50, 100, 200), (50, 100, 200)),
  ((0, 0, 128), (128, 128, 128), (128, 128, 128)),
]


def test_bgr_to_hsv_matches_opencv_table():
  bgr = np.array([row[0] for row in BGR_TO_HSV], np.uint8)
  want = np.array([row[1] for row in BGR_TO_HSV], np.uint8)
  np.testing.assert_array_equal(color_jitter.bgr_to_hsv(bgr), want)
  # Any leading shape.
  np.testing.assert_array_equal(
    color_jitter.bgr_to_hsv(bgr.reshape(2, 7, 3)), want.reshape(2, 7, 3)
  )


def test_hsv_to_bgr_matches_opencv_table():
  hsv = np.array([row[0] for row in HSV_TO_BGR], np.uint8)
  for rounding, column in (("truncate", 1), ("nearest", 2)):
    want = np.array([row[column] for row in HSV_TO_BGR], np.uint8)
    np.testing.assert_array_equal(color_jitter.hsv_to_bgr(hsv, rounding), want, err_msg=rounding)
  np.testing.assert_array_equal(
    color_jitter.hsv_to_bgr(hsv), color_jitter.hsv_to_bgr(hsv, "truncate")
  )
  with pytest.raises(ValueError, match="rounding"):
    color_jitter.hsv_to_bgr(hsv, "floor")


def test_hsv_round_trip():
  rng = np.random.default_rng(0)
  bgr = rng.integers(0, 256, (50_000, 3)).astype(np.uint8)
  hsv = color_jitter.bgr_to_hsv(bgr)
  assert hsv.dtype == np.uint8 and hsv[:, 0].max() < 180  # OpenCV's half-degree hue
  for rounding in ("truncate", "nearest"):
    back = color_jitter.hsv_to_bgr(hsv, rounding).astype(np.int64)
    # uint8 HSV loses a little hue / saturation precision (at most 6 levels over all 2**24
    # colours), but the maximum channel (V) comes back exactly.
    assert np.abs(back - bgr).max() <= 6
    np.testing.assert_array_equal(back.max(-1), bgr.max(-1))
  # Greys and the six primary / secondary colours survive exactly (rounded variant).
  grey = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1)
  for rounding in ("truncate", "nearest"):
    np.testing.assert_array_equal(
      color_jitter.hsv_to_bgr(color_jitter.bgr_to_hsv(grey), rounding), grey
    )
  pure = np.array([row[0] for row in BGR_TO_HSV[:6]], np.uint8)
  np.testing.assert_array_equal(
    color_jitter.hsv_to_bgr(color_jitter.bgr_to_hsv(pure), "nearest"), pure
  )


# ---------------------------------------------------------------------------------------------
# SSD colour jitter.


def _rgb(*pixels):
  return np.array([pixels], np.uint8)  # [1, n, 3]


def test_color_jitter_steps():
  image = _rgb((250, 100, 0), (10, 3, 128))
  np.testing.assert_array_equal(color_jitter.apply_color_jitter(image, NO_JITTER), image)
  # Brightness: float32 x + beta, clipped, truncated to uint8.
  brighter = ColorJitter(10.7, True, None, None, None)
  np.testing.assert_array_equal(
    color_jitter.apply_color_jitter(image, brighter), _rgb((255, 110, 10), (20, 13, 138))
  )
  darker = ColorJitter(-20.3, True, None, None, None)
  np.testing.assert_array_equal(
    color_jitter.apply_color_jitter(image, darker), _rgb((229, 79, 0), (0, 0, 107))
  )
  # Contrast: x * alpha, clipped, truncated.
  contrast = ColorJitter(None, True, 1.5, None, None)
  np.testing.assert_array_equal(
    color_jitter.apply_color_jitter(image, contrast), _rgb((255, 150, 0), (15, 4, 192))
  )
  # Saturation and hue leave greys alone.
  grey = _rgb((128, 128, 128), (7, 7, 7))
  colourless = ColorJitter(None, True, None, 1.4, 17)
  np.testing.assert_array_equal(color_jitter.apply_color_jitter(grey, colourless), grey)
  # Hue: red (H 0) turned by +18 (36 degrees) and -18 (to H 162). float32 rounding leaves
  # 255 * 0.5999999 = 152.99997 on the negative side, truncated to 152.
  red = _rgb((255, 0, 0))
  np.testing.assert_array_equal(
    color_jitter.apply_color_jitter(red, ColorJitter(None, True, None, None, 18)),
    _rgb((255, 153, 0)),
  )
  np.testing.assert_array_equal(
    color_jitter.apply_color_jitter(red, ColorJitter(None, True, None, None, -18)),
    _rgb((255, 0, 152)),
  )
  # Saturation 0.5 of RGB (200, 100, 50): HSV (10, 191, 200) -> S 95 -> BGR.
  half = color_jitter.apply_color_jitter(
    _rgb((200, 100, 50)), ColorJitter(None, True, None, 0.5, None)
  )
  want = color_jitter.hsv_to_bgr(np.array([[[10, 95, 200]]], np.uint8))[..., ::-1]
  np.testing.assert_array_equal(half, want)


def test_color_jitter_contrast_order():
  image = np.random.default_rng(1).integers(0, 256, (8, 8, 3)).astype(np.uint8)
  bgr = image[..., ::-1]

  def saturate(x, alpha):
    hsv = color_jitter.bgr_to_hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * np.float32(alpha), 0, 255)
    return color_jitter.hsv_to_bgr(hsv)

  def contrast(x, alpha):
    return np.clip(x.astype(np.float32) * np.float32(alpha), 0, 255).astype(np.uint8)

  first = color_jitter.apply_color_jitter(image, ColorJitter(None, True, 1.3, 0.6, None))
  last = color_jitter.apply_color_jitter(image, ColorJitter(None, False, 1.3, 0.6, None))
  np.testing.assert_array_equal(first, saturate(contrast(bgr, 1.3), 0.6)[..., ::-1])
  np.testing.assert_array_equal(last, contrast(saturate(bgr, 0.6), 1.3)[..., ::-1])
  assert not np.array_equal(first, last)


def test_color_jitter_draws():
  draws = [color_jitter.draw_color_jitter(np.random.default_rng(i)) for i in range(400)]
  for field in ("brightness", "contrast", "saturation", "hue"):
    applied = [getattr(d, field) for d in draws if getattr(d, field) is not None]
    assert 140 < len(applied) < 260, field  # probability 0.5
  assert 140 < sum(d.contrast_first for d in draws) < 260
  brightness = [d.brightness for d in draws if d.brightness is not None]
  assert -32 <= min(brightness) < -25 and 25 < max(brightness) <= 32
  for field in ("contrast", "saturation"):
    values = [getattr(d, field) for d in draws if getattr(d, field) is not None]
    assert 0.5 <= min(values) < 0.6 and 1.4 < max(values) <= 1.5
  hues = {d.hue for d in draws if d.hue is not None}
  assert all(isinstance(h, int) for h in hues) and hues == set(range(-18, 19))


# ---------------------------------------------------------------------------------------------
# ResizeShortestEdge, category map, category-area crop.


@pytest.mark.parametrize(
  "size, short, max_size, want",
  [
    ((480, 640), 512, 2048, (512, 683)),  # 682.67 rounds up
    ((640, 480), 512, 2048, (683, 512)),
    ((2, 3), 3, 100, (3, 5)),  # 4.5 -> int(4.5 + 0.5) = 5 (Python's round would give 4)
    ((100, 1000), 200, 1333, (133, 1333)),  # long side 2000 clamped to 1333
    ((1000, 100), 200, 1333, (1333, 133)),
    ((1024, 2048), 1024, 2048, (1024, 2048)),  # Cityscapes' test resize is the identity
    ((64, 64), 96, 128, (96, 96)),  # square: both sides, enlarging
    ((48, 80), 64, 96, (58, 96)),  # 64 x 106.67 clamped: 96 / 106.67 * 64 = 57.6
  ],
)
def test_shortest_edge_size(size, short, max_size, want):
  assert transforms.shortest_edge_size(size, short, max_size) == want


def test_category_map():
  pan = np.array([[0, 5, 5], [7, 7, 9], [42, 5, 0]])
  # 5: category 3, 7: category 1 (crowd: still its class), 9: category 3; 42 is not listed.
  out = transforms.category_map(pan, np.array([9, 5, 7]), np.array([3, 3, 1]), IGNORE)
  np.testing.assert_array_equal(out, [[IGNORE, 3, 3], [1, 1, 3], [IGNORE, 3, IGNORE]])
  assert out.dtype == np.int32
  empty = transforms.category_map(pan, np.array([], np.int64), np.array([], np.int64), 0)
  assert not empty.any()


def _fraction(top, left, size, crop):
  """Draws that make `crop_window` place a window at `(top, left)`."""
  return ((top + 0.5) / (size[0] - crop[0] + 1), (left + 0.5) / (size[1] - crop[1] + 1))


# 20 x 40: category 1 on columns 0-24, void on 25-29, category 2 on 30-39 above row 15 and
# category 3 below it.
CATEGORIES = np.ones((20, 40), np.int32)
CATEGORIES[:, 25:30] = IGNORE
CATEGORIES[:15, 30:] = 2
CATEGORIES[15:, 30:] = 3
CROP = (10, 10)
ONE_CATEGORY = (0, 0)  # only category 1
VOID_AND_ONE = (0, 20)  # category 1 and void: one category once void is ignored
SIXTY_PERCENT = (0, 22)  # category 1: 30 pixels, category 2: 20 -> 0.6 is not below 0.6
BALANCED = (10, 25)  # void, category 2: 25 pixels, category 3: 25 -> 0.5
BALANCED_TOO = (10, 26)


def _window(*offsets):
  return np.array([_fraction(top, left, CATEGORIES.shape, CROP) for top, left in offsets])


def test_crop_takes_the_first_window_that_meets_the_area_constraint():
  fractions = _window(ONE_CATEGORY, VOID_AND_ONE, SIXTY_PERCENT, BALANCED, BALANCED_TOO)
  window = transforms.crop_window(CATEGORIES.shape, CROP, fractions, CATEGORIES, 0.6, IGNORE)
  assert window == (*BALANCED, *CROP)
  # A looser limit accepts the 60 % window; 1.0 takes the first window unchecked.
  window = transforms.crop_window(CATEGORIES.shape, CROP, fractions, CATEGORIES, 0.61, IGNORE)
  assert window == (*SIXTY_PERCENT, *CROP)
  assert transforms.crop_window(CATEGORIES.shape, CROP, fractions) == (*ONE_CATEGORY, *CROP)


def test_crop_falls_back_to_the_last_window_after_ten_failures():
  failing = [ONE_CATEGORY, VOID_AND_ONE, SIXTY_PERCENT] * 3 + [(5, 1)]
  assert len(failing) == transforms.CROP_TRIES
  fractions = _window(*failing)
  window = transforms.crop_window(CATEGORIES.shape, CROP, fractions, CATEGORIES, 0.6, IGNORE)
  assert window == (5, 1, *CROP)
  # All void: no category at all is a failure too.
  void = np.full_like(CATEGORIES, IGNORE)
  assert transforms.crop_window(void.shape, CROP, fractions, void, 0.6, IGNORE) == (5, 1, *CROP)
  with pytest.raises(ValueError, match="category map"):
    transforms.crop_window(CATEGORIES.shape, CROP, fractions, None, 0.6, IGNORE)


def test_crop_is_clipped_to_a_smaller_image():
  fractions = np.array([[0.99, 0.5]])
  assert transforms.crop_window((8, 30), CROP, fractions) == (0, 10, 8, 10)


# ---------------------------------------------------------------------------------------------
# The short-side training transform.

PALETTE = np.array([[0, 0, 0], [250, 10, 10], [10, 250, 10], [10, 10, 250]], np.uint8)
SEGMENT_IDS = np.array([1, 2, 3])
SEGMENT_CATEGORIES = np.array([10, 11, 1])
SIZES, MAX_SIZE, CROP_SIZE = (40, 48, 64), 80, (48, 48)


def _scene(h=60, w=90):
  """id 1 on the left third, 2 elsewhere, 3 a block at the top right, void (0) at the bottom."""
  ids = np.full((h, w), 2, np.int32)
  ids[:, : w // 3] = 1
  ids[: h // 4, -w // 4 :] = 3
  ids[-h // 6 :] = 0
  return PALETTE[ids], ids


def _draws(key):
  """The transform's draws for `example_rng(*key)`, in its order."""
  rng = transforms.example_rng(*key)
  short = SIZES[int(rng.integers(len(SIZES)))]
  fractions = rng.random((transforms.CROP_TRIES, 2))
  flipped = rng.random() < 0.5
  return short, fractions, flipped, color_jitter.draw_color_jitter(rng)


def _run(image, ids, key, flip=True, **kwargs):
  return transforms.short_side_transform(
    image, ids, transforms.example_rng(*key), CROP_SIZE, SIZES, MAX_SIZE, flip, **kwargs
  )


def _denormalize(image):
  return image * transforms.PIXEL_STD + transforms.PIXEL_MEAN


def test_short_side_keeps_image_and_ids_aligned():
  image, ids = _scene()
  categories = transforms.category_map(ids, SEGMENT_IDS, SEGMENT_CATEGORIES, IGNORE)
  flips, jittered = set(), 0
  for seed in range(10):
    key = (seed, 0, 0)
    out_image, out_ids = _run(
      image, ids, key, color_jitter=True, single_category_max_area=0.7, categories=categories
    )
    assert out_image.shape == (*CROP_SIZE, 3) and out_image.dtype == np.float32
    assert out_ids.shape == CROP_SIZE and out_ids.dtype == np.int32
    # The id map is the nearest-resized map, cropped where `crop_window` says, then flipped.
    short, fractions, flipped, jitter = _draws(key)
    size = transforms.shortest_edge_size(ids.shape, short, MAX_SIZE)
    top, left, h, w = transforms.crop_window(
      size, CROP_SIZE, fractions, transforms.resize_ids(categories, size), 0.7, IGNORE
    )
    want = transforms.resize_ids(ids, size)[top : top + h, left : left + w]
    want = want[:, ::-1] if flipped else want
    np.testing.assert_array_equal(out_ids, transforms.pad_to(want, CROP_SIZE))
    flips.add(flipped)
    # Away from boundaries, every pixel has its id's (jittered) colour, void included.
    interior = np.zeros(CROP_SIZE, bool)
    same = out_ids[1:-1, 1:-1]
    interior[1:-1, 1:-1] = np.all(
      [
        np.roll(np.roll(out_ids, dy, 0), dx, 1)[1:-1, 1:-1] == same
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
      ],
      axis=0,
    )
    interior[h - 1 :] = interior[:, w - 1 :] = False  # padding and its border
    assert interior.sum() > 200
    colours = color_jitter.apply_color_jitter(PALETTE[None], jitter)[0]
    np.testing.assert_allclose(
      _denormalize(out_image)[interior], colours[out_ids[interior]], atol=1e-3
    )
    jittered += not np.array_equal(colours, PALETTE)
    # Padding is void and the mean colour.
    assert not out_ids[h:].any() and not out_ids[:, w:].any()
    np.testing.assert_allclose(out_image[h:], 0, atol=1e-6)
    np.testing.assert_allclose(out_image[:, w:], 0, atol=1e-6)
  assert flips == {True, False} and jittered > 3


def _category_shares(window_ids):
  categories = transforms.category_map(window_ids, SEGMENT_IDS, SEGMENT_CATEGORIES, IGNORE)
  labels, counts = np.unique(categories, return_counts=True)
  return counts[labels != IGNORE]


def _meets(counts, limit):
  return len(counts) > 1 and counts.max() < counts.sum() * limit


def test_short_side_crop_meets_the_category_area_constraint():
  image, ids = _scene()
  categories = transforms.category_map(ids, SEGMENT_IDS, SEGMENT_CATEGORIES, IGNORE)
  limit, retried = 0.6, 0
  for seed in range(20):
    key = (seed, 1, 0)
    _, out_ids = _run(
      image, ids, key, flip=False, single_category_max_area=limit, categories=categories
    )
    short, fractions, _, _ = _draws(key)
    size = transforms.shortest_edge_size(ids.shape, short, MAX_SIZE)
    big = transforms.resize_ids(ids, size)
    h, w = min(CROP_SIZE[0], size[0]), min(CROP_SIZE[1], size[1])
    tries = [(int(f[0] * (size[0] - h + 1)), int(f[1] * (size[1] - w + 1))) for f in fractions]
    ok = [_meets(_category_shares(big[t : t + h, x : x + w]), limit) for t, x in tries]
    if any(ok):  # the first acceptable window is taken
      t, x = tries[ok.index(True)]
      assert _meets(_category_shares(out_ids[:h, :w]), limit)
      retried += not ok[0]
    else:  # ten failures: the last window
      t, x = tries[-1]
    np.testing.assert_array_equal(out_ids[:h, :w], big[t : t + h, x : x + w])
  assert retried >= 3  # cases where the first random crops violated the constraint


def test_short_side_uses_the_last_crop_when_every_window_fails():
  # Every pixel its own segment, all of one category: no window can hold two categories.
  h, w = 60, 90
  ids = np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w)
  categories = np.full((h, w), 4, np.int32)
  image = np.zeros((h, w, 3), np.uint8)
  for seed in range(3):
    key = (seed, 0, 5)
    _, out_ids = _run(
      image, ids, key, flip=False, single_category_max_area=0.9, categories=categories
    )
    short, fractions, _, _ = _draws(key)
    size = transforms.shortest_edge_size(ids.shape, short, MAX_SIZE)
    ch, cw = min(CROP_SIZE[0], size[0]), min(CROP_SIZE[1], size[1])
    top = int(fractions[-1, 0] * (size[0] - ch + 1))
    left = int(fractions[-1, 1] * (size[1] - cw + 1))
    want = transforms.resize_ids(ids, size)[top : top + ch, left : left + cw]
    np.testing.assert_array_equal(out_ids[:ch, :cw], want)


def test_short_side_is_deterministic_and_draws_a_fixed_stream():
  image, ids = _scene()
  categories = transforms.category_map(ids, SEGMENT_IDS, SEGMENT_CATEGORIES, IGNORE)
  options = dict(color_jitter=True, single_category_max_area=0.6, categories=categories)
  a, b = _run(image, ids, (0, 3, 7), **options), _run(image, ids, (0, 3, 7), **options)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  c = _run(image, ids, (0, 4, 7), **options)
  assert not np.array_equal(a[0], c[0])  # another epoch, another augmentation
  # Whatever the options, the transform consumes the same numbers from the generator.
  after = []
  for kwargs in ({}, options, {"flip": False, "color_jitter": True}):
    rng = transforms.example_rng(0, 3, 7)
    flip = kwargs.pop("flip", True)
    transforms.short_side_transform(image, ids, rng, CROP_SIZE, SIZES, MAX_SIZE, flip, **kwargs)
    after.append(rng.random())
  assert after[0] == after[1] == after[2]


def test_short_side_without_jitter_or_flip_is_resize_and_crop():
  image, ids = _scene(64, 48)
  for seed in range(4):
    key = (seed, 0, 1)
    out_image, out_ids = _run(image, ids, key, flip=False)
    short, fractions, _, _ = _draws(key)
    size = transforms.shortest_edge_size(ids.shape, short, MAX_SIZE)
    top, left, h, w = transforms.crop_window(size, CROP_SIZE, fractions)
    want = transforms.resize_image(image, size)[top : top + h, left : left + w]
    np.testing.assert_array_equal(
      out_image, transforms.pad_to(transforms.normalize(want), CROP_SIZE)
    )


# ---------------------------------------------------------------------------------------------
# The test resize.


def test_eval_transform_applies_the_test_resize():
  image, ids = _scene(48, 80)
  out_image, out_ids, size = transforms.eval_transform(image, ids, (64, 128), 64, 128)
  assert size == (64, 107)  # 80 * 64 / 48 = 106.67
  np.testing.assert_array_equal(out_ids[:64, :107], transforms.resize_ids(ids, (64, 107)))
  assert not out_ids[:, 107:].any()
  want = transforms.normalize(transforms.resize_image(image, (64, 107)))
  np.testing.assert_allclose(out_image[:, :107], want, atol=1e-6)
  np.testing.assert_allclose(out_image[:, 107:], 0)
  # The long-side cap.
  assert transforms.eval_transform(image, ids, (64, 128), 64, 96)[2] == (58, 96)
  # A resize that does not fit the canvas is an error naming the image.
  with pytest.raises(ValueError, match=r"frame_7\.png.*\(64, 107\).*eval_size"):
    transforms.eval_transform(image, ids, (64, 96), 64, 128, name="frame_7.png")


def test_inference_transform_applies_the_test_resize():
  image, _ = _scene(48, 80)
  out, size = transforms.inference_transform(image, (64, 128), 64, 128)
  assert size == (64, 107) and out.shape == (64, 128, 3)
  np.testing.assert_allclose(
    out[:, :107], transforms.normalize(transforms.resize_image(image, (64, 107))), atol=1e-6
  )
  with pytest.raises(ValueError, match="b.png"):
    transforms.inference_transform(image, (64, 96), 64, 128, name="b.png")
  # Without a test resize: unchanged behaviour (shrink to fit only).
  assert transforms.inference_transform(image, (64, 96))[1] == (48, 80)


# ---------------------------------------------------------------------------------------------
# Loaders.


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  c = default_dataset_config()
  c.data_dir = str(tmp_path_factory.mktemp("tfds"))
  c.synthetic.image_size = (48, 80)
  c.synthetic.num_train, c.synthetic.num_validation = 8, 4
  c.crop_size, c.eval_size = (64, 64), (64, 128)
  c.max_gt = 8
  c.augmentation = "short_side"
  c.short_side.sizes = (48, 64, 96)
  c.short_side.max_size = 128
  c.short_side.single_category_max_area = 0.75
  c.short_side.color_jitter = True
  c.eval_short_side, c.eval_max_size = 64, 128
  sources.open_source(c, "train_split")  # build once for the module
  return c


def _copy(config, **changes):
  c = config.copy_and_resolve_references()
  c.update(changes)
  return c


def test_short_side_train_batch(config):
  it = pipeline.create_train_loader(config, 4, seed=0, process_index=0, process_count=1)
  batch = next(it)
  assert batch["image"].shape == (4, 64, 64, 3) and batch["segment_ids"].shape == (4, 64, 64)
  meta = dataset_metadata(config)
  for b in range(4):
    valid = batch["valid"][b]
    assert valid.any()
    for j in np.nonzero(valid)[0]:
      assert np.any(batch["segment_ids"][b] == batch["ids"][b, j])
      assert 0 <= batch["labels"][b, j] < meta.num_classes
  # The first example is the transform of its record with its generator.
  record = pipeline.GlobalBatchSampler(8, 4, 0, 1, seed=0)[0].record_key
  element = sources.open_source(config, "train_split")[record]
  pan = panoptic_png.rgb_to_id(element["panoptic"])
  segments = element["segments"]
  categories = transforms.category_map(pan, segments["id"], segments["category_id"], IGNORE)
  image, ids = transforms.short_side_transform(
    element["image"],
    pan,
    transforms.example_rng(0, 0, record),
    (64, 64),
    (48, 64, 96),
    128,
    True,
    color_jitter=True,
    single_category_max_area=0.75,
    categories=categories,
  )
  np.testing.assert_array_equal(batch["image"][0], image)
  targets = panoptic_to_targets(
    ids, segments, "panoptic", 8, meta.thing_category_ids, meta.category_to_label
  )
  for key in ("segment_ids", "ids", "labels", "valid"):
    np.testing.assert_array_equal(batch[key][0], targets[key])


def test_ignore_label_must_not_be_a_category(config):
  clash = _copy(config)
  clash.short_side.ignore_label = 1  # a synthetic_shapes category id
  with pytest.raises(ValueError, match="dataset.short_side.ignore_label"):
    pipeline.create_train_loader(clash, 4, seed=0, process_index=0, process_count=1)


def test_eval_loader_applies_the_test_resize(config):
  source = sources.open_source(config, "eval_split")
  batch = next(iter(pipeline.create_eval_loader(config, 4, process_index=0, process_count=1)))
  assert batch["image"].shape == (4, 64, 128, 3)
  for b in range(4):
    np.testing.assert_array_equal(batch["image_size"][b], [48, 80])
    np.testing.assert_array_equal(batch["resized_size"][b], [64, 107])
    element = source[int(batch["index"][b])]
    original = panoptic_png.rgb_to_id(element["panoptic"])
    # The network sees the resized image; its training targets follow it.
    resized = transforms.resize_ids(original, (64, 107))
    ids = batch["ids"][b][batch["valid"][b]]
    np.testing.assert_array_equal(np.isin(resized, ids), batch["segment_ids"][b, :, :107] > 0)
    assert not batch["segment_ids"][b, :, 107:].any()
    # The ground truth that is scored keeps the original size (in the eval_size canvas here).
    assert batch["panoptic"].shape == (4, 64, 128)
    np.testing.assert_array_equal(batch["panoptic"][b, :48, :80], original)
    assert not batch["panoptic"][b, 48:].any() and not batch["panoptic"][b, :, 80:].any()
  # A canvas of its own for the original size.
  own = _copy(config, eval_original_size=(50, 81))
  batch = next(iter(pipeline.create_eval_loader(own, 4, process_index=0, process_count=1)))
  assert batch["panoptic"].shape == (4, 50, 81) and batch["image"].shape == (4, 64, 128, 3)
  # An eval_size that cannot hold the resize fails, naming the example; so does an original
  # canvas that cannot hold the original.
  small = _copy(config, eval_size=(64, 96))
  with pytest.raises(ValueError, match="example 0 of split 'validation'.*eval_size"):
    next(iter(pipeline.create_eval_loader(small, 4, process_index=0, process_count=1)))
  small = _copy(config, eval_original_size=(48, 79))
  with pytest.raises(ValueError, match="example 0 of split 'validation'.*eval_original_size"):
    next(iter(pipeline.create_eval_loader(small, 4, process_index=0, process_count=1)))
