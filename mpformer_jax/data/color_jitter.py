"""Mask2Former's SSD colour jitter (`ColorAugSSDTransform`) in numpy, with OpenCV's uint8 HSV.

The reference jitters a uint8 image in BGR order: a random brightness shift, then contrast,
saturation and hue in one of two orders (contrast first or last), each step applied with
probability 0.5. Saturation and hue go through `cv2.cvtColor(..., COLOR_BGR2HSV)` and back on
uint8, whose rounding shapes the result, so `bgr_to_hsv` / `hsv_to_bgr` reproduce OpenCV's
uint8 arithmetic (H in `[0, 180)`, S and V in `[0, 255]`) instead of a textbook float HSV.

Deviation (documented in `hsv_to_bgr`): OpenCV 4's HSV -> BGR truncates in its vectorised
loop but rounds in the scalar loop that finishes each row's last few pixels; we truncate
everywhere by default.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# `ColorAugSSDTransform`'s defaults.
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18

_HSV_SHIFT = 12  # OpenCV's fixed-point precision for the uint8 BGR -> HSV division tables
_HALF = 1 << (_HSV_SHIFT - 1)


def _division_table(numerator: int, denominator_scale: float) -> np.ndarray:
  """int32 `[256]`: `round(numerator / (denominator_scale * i))`, 0 at `i = 0`.

  OpenCV's `saturate_cast<int>(double)` rounds half to even, as `np.rint` does.
  """
  i = np.arange(1, 256, dtype=np.float64)
  return np.concatenate([[0], np.rint(numerator / (denominator_scale * i))]).astype(np.int32)


# S = diff * 255 / V and H = hue_numerator * 30 / diff, both as fixed-point multiplications
# (products stay below 2**31).
_SDIV = _division_table(255 << _HSV_SHIFT, 1.0)
_HDIV = _division_table(180 << _HSV_SHIFT, 6.0)


def _hsv_tables():
  """Per uint8 code: the float32 hue fraction, the S / V value, and the channel shifts.

  OpenCV computes `h * (6.f / 180)` in float32, splits it into a sector and a fraction, and
  reads B, G, R from `tab = v, v (1 - s), v (1 - s f), v (1 - s (1 - f))` by sector; all of it
  depends on the uint8 H only, so it is tabulated once. A shift of `8 k` selects `tab[k]` from
  the four uint8 tab values packed into one uint32.
  """
  codes = np.arange(256, dtype=np.float32)
  hue = codes * (np.float32(6.0) / np.float32(180.0))
  whole = np.floor(hue)
  fraction = (hue - whole).astype(np.float32)
  sector = whole.astype(np.int64) % 6  # only H >= 180, never produced by bgr_to_hsv, wraps
  tab_of_bgr = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])
  shifts = (8 * tab_of_bgr[sector]).astype(np.uint32)  # [256, 3]
  unit = (codes * (np.float32(1.0) / np.float32(255.0))).astype(np.float32)
  return fraction, unit, shifts


_FRACTION, _UNIT, _SHIFTS = _hsv_tables()


def bgr_to_hsv(bgr: np.ndarray) -> np.ndarray:
  """OpenCV's `COLOR_BGR2HSV` on uint8, bit-exact.

  Args:
    bgr: uint8 `[..., 3]` in B, G, R order.

  Returns:
    uint8 `[..., 3]`: H in `[0, 180)` (degrees / 2), S and V in `[0, 255]`.
  """
  b, g, r = (bgr[..., k].astype(np.int32) for k in range(3))
  v = np.maximum(np.maximum(b, g), r)
  diff = v - np.minimum(np.minimum(b, g), r)
  s = (diff * _SDIV[v] + _HALF) >> _HSV_SHIFT
  # OpenCV's priority when two channels tie for the maximum: red, then green, then blue.
  h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
  h = (h * _HDIV[diff] + _HALF) >> _HSV_SHIFT  # arithmetic shift: floors negative values
  h[h < 0] += 180
  hsv = np.empty(bgr.shape, np.uint8)
  hsv[..., 0], hsv[..., 1], hsv[..., 2] = h, s, v
  return hsv


def hsv_to_bgr(hsv: np.ndarray, rounding: str = "truncate") -> np.ndarray:
  """OpenCV's `COLOR_HSV2BGR` on uint8 (H in `[0, 180)`), computed in float32 as OpenCV does.

  OpenCV 4 (`color_hsv.simd.hpp`) converts most pixels in a vectorised loop that truncates
  `channel * 255` to an integer, and the last `width mod (4 * float lanes)` pixels of each row
  (16 with SSE, 32 with AVX2) in a scalar loop that rounds it (`saturate_cast`); OpenCV 3
  rounded everywhere. One rule must be picked for a whole image: "truncate" (the default)
  matches the vectorised loop, so it differs from OpenCV by at most 1 per channel on the
  tail pixels of each row; "nearest" matches the scalar loop.

  Args:
    hsv: uint8 `[..., 3]`: H in `[0, 180)`, S, V.
    rounding: "truncate" or "nearest" (half to even), see above.

  Returns:
    uint8 `[..., 3]` in B, G, R order.
  """
  if rounding not in ("truncate", "nearest"):
    raise ValueError(f"rounding must be 'truncate' or 'nearest', got {rounding!r}")
  hue = hsv[..., 0]
  f, s, v = _FRACTION[hue], _UNIT[hsv[..., 1]], _UNIT[hsv[..., 2]]
  one = np.float32(1.0)
  packed = np.zeros(hsv.shape[:-1], np.uint32)
  for k, tab in enumerate((v, v * (one - s), v * (one - s * f), v * (one - s * (one - f)))):
    scaled = tab * np.float32(255.0)
    scaled = np.trunc(scaled) if rounding == "truncate" else np.rint(scaled)
    packed |= np.clip(scaled, 0, 255).astype(np.uint32) << np.uint32(8 * k)
  bgr = np.empty(hsv.shape, np.uint8)
  for c in range(3):
    bgr[..., c] = ((packed >> _SHIFTS[hue, c]) & np.uint32(255)).astype(np.uint8)
  return bgr


@dataclasses.dataclass(frozen=True)
class ColorJitter:
  """One image's draws of the SSD colour jitter; None means the step is skipped.

  Attributes:
    brightness: added to every channel, in `[-32, 32)`.
    contrast_first: contrast before saturation and hue (else after them).
    contrast: multiplies every channel, in `[0.5, 1.5)`.
    saturation: multiplies S, in `[0.5, 1.5)`.
    hue: added to H (mod 180), an integer in `[-18, 18]`.
  """

  brightness: float | None
  contrast_first: bool
  contrast: float | None
  saturation: float | None
  hue: int | None


def draw_color_jitter(rng: np.random.Generator) -> ColorJitter:
  """The jitter of one image: always 9 draws from `rng`, whichever steps end up applied."""
  apply = rng.random(5) < 0.5  # brightness, contrast first, contrast, saturation, hue
  brightness = float(rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
  contrast = float(rng.uniform(*CONTRAST_RANGE))
  saturation = float(rng.uniform(*SATURATION_RANGE))
  hue = int(rng.integers(-HUE_DELTA, HUE_DELTA + 1))
  return ColorJitter(
    brightness=brightness if apply[0] else None,
    contrast_first=bool(apply[1]),
    contrast=contrast if apply[2] else None,
    saturation=saturation if apply[3] else None,
    hue=hue if apply[4] else None,
  )


def _convert(channels: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """The reference's `convert`: float32 `x * alpha + beta`, clipped, truncated to uint8."""
  out = channels.astype(np.float32) * np.float32(alpha) + np.float32(beta)
  return np.clip(out, 0, 255).astype(np.uint8)


def _contrast(bgr: np.ndarray, alpha: float | None) -> np.ndarray:
  return bgr if alpha is None else _convert(bgr, alpha=alpha)


def _saturation(bgr: np.ndarray, alpha: float) -> np.ndarray:
  hsv = bgr_to_hsv(bgr)
  hsv[..., 1] = _convert(hsv[..., 1], alpha=alpha)
  return hsv_to_bgr(hsv)


def _hue(bgr: np.ndarray, delta: int) -> np.ndarray:
  hsv = bgr_to_hsv(bgr)
  hsv[..., 0] = (hsv[..., 0].astype(np.int64) + delta) % 180
  return hsv_to_bgr(hsv)


def apply_color_jitter(image: np.ndarray, jitter: ColorJitter) -> np.ndarray:
  """`ColorAugSSDTransform.apply_image` of a uint8 RGB image with the given draws.

  Args:
    image: uint8 `[H, W, 3]` RGB.
    jitter: the draws (`draw_color_jitter`).

  Returns:
    uint8 `[H, W, 3]` RGB.
  """
  bgr = np.ascontiguousarray(image[..., ::-1])  # the reference works in BGR
  if jitter.brightness is not None:
    bgr = _convert(bgr, beta=jitter.brightness)
  if jitter.contrast_first:
    bgr = _contrast(bgr, jitter.contrast)
  if jitter.saturation is not None:
    bgr = _saturation(bgr, jitter.saturation)
  if jitter.hue is not None:
    bgr = _hue(bgr, jitter.hue)
  if not jitter.contrast_first:
    bgr = _contrast(bgr, jitter.contrast)
  return np.ascontiguousarray(bgr[..., ::-1])
