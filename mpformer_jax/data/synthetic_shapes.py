"""Procedural panoptic scenes: coloured, textured shapes on 1-3 background regions (numpy only).

A scene is a pure function of `(seed, index)`, so the dataset can be regenerated bit for bit and
never needs a download. Each image has:

- 1-3 "stuff" regions (sky, grass, wall) separating the image along straight or gently curved
  boundaries; every region is one segment;
- 1..`max_instances` "thing" instances (circle, square, triangle, ring, star) of 8%..40% of the
  image side, painted in order, so later instances occlude earlier ones.

Colour is class-correlated (a class hue plus jitter) and texture (flat, stripes, noise) is random
per instance, so the classes are learnable from shape and colour. A segment whose visible area
ends up below `min_area` pixels (occluded, or a sliver at the border) is removed and its pixels
become void (id 0): the image still shows it, but it is unlabeled, as in COCO.
"""

from __future__ import annotations

import colorsys

import numpy as np

# Category ids deliberately have gaps, like COCO's, so that the mapping to contiguous training
# labels is always exercised. Things come first, then stuff (detectron2's COCO order).
CATEGORIES = (
  {"id": 1, "name": "circle", "isthing": True},
  {"id": 2, "name": "square", "isthing": True},
  {"id": 4, "name": "triangle", "isthing": True},
  {"id": 5, "name": "ring", "isthing": True},
  {"id": 7, "name": "star", "isthing": True},
  {"id": 10, "name": "sky", "isthing": False},
  {"id": 11, "name": "grass", "isthing": False},
  {"id": 13, "name": "wall", "isthing": False},
)
THING_IDS = tuple(c["id"] for c in CATEGORIES if c["isthing"])
STUFF_IDS = tuple(c["id"] for c in CATEGORIES if not c["isthing"])

# Class appearance: (hue, saturation, value) centres. Thing hues are far apart so colour is a
# strong cue; stuff colours are muted so things stand out.
_APPEARANCE = {
  1: (0.00, 0.85, 0.90),  # circle: red
  2: (0.14, 0.85, 0.90),  # square: yellow
  4: (0.50, 0.80, 0.85),  # triangle: cyan
  5: (0.72, 0.70, 0.85),  # ring: violet
  7: (0.86, 0.80, 0.90),  # star: magenta
  10: (0.58, 0.35, 0.95),  # sky: pale blue
  11: (0.30, 0.60, 0.55),  # grass: green
  13: (0.08, 0.25, 0.60),  # wall: brownish grey
}

MIN_SIZE_FRACTION = 0.08  # instance extent relative to the shorter image side
MAX_SIZE_FRACTION = 0.40
MIN_REGION_FRACTION = 0.2  # each stuff region gets at least this share of the image


def generate_scene(
  seed: int,
  index: int,
  image_size: tuple[int, int] = (128, 128),
  max_instances: int = 6,
  min_area: int = 16,
) -> dict:
  """One procedural panoptic scene.

  Args:
    seed: dataset seed.
    index: example index; `(seed, index)` fully determines the scene.
    image_size: `(H, W)`.
    max_instances: the number of thing instances is uniform in `[1, max_instances]` (before
      removing the ones that end up smaller than `min_area`).
    min_area: segments with fewer visible pixels are removed and become void.

  Returns:
    A dict with `image` uint8 `[H, W, 3]`, `panoptic` int32 `[H, W]` (0 = void, else a segment
    id in `[1, 2**24)`, so it fits COCO's RGB encoding) and `segments`, a list of
    `{"id", "category_id", "area", "iscrowd"}` dicts (stuff regions first, then things in
    painting order; `area` is the visible pixel count; `iscrowd` is always False).
  """
  if max_instances < 1:
    raise ValueError(f"max_instances must be >= 1, got {max_instances}")
  h, w = image_size
  rng = np.random.default_rng([seed, index])
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres

  # Background regions. `slot` holds, per pixel, the index of the segment it shows.
  num_regions = int(rng.integers(1, len(STUFF_IDS) + 1))
  slot = _region_layout(rng, xx / w, yy / h, num_regions)
  categories = [int(c) for c in rng.choice(STUFF_IDS, num_regions, replace=False)]
  image = np.zeros((h, w, 3), np.float32)
  for k, cat in enumerate(categories):
    region = slot == k
    image[region] = _stuff_pixels(rng, cat, xx[region], yy[region])

  # Things, painted in order: later ones occlude earlier ones.
  num_things = int(rng.integers(1, max_instances + 1))
  side = min(h, w)
  for _ in range(num_things):
    cat = int(rng.choice(THING_IDS))
    radius = 0.5 * side * rng.uniform(MIN_SIZE_FRACTION, MAX_SIZE_FRACTION)
    centre = (rng.uniform(0, w), rng.uniform(0, h))
    angle = rng.uniform(0, 2 * np.pi)
    mask = _shape_mask(rng, cat, xx, yy, centre, radius, angle)
    slot[mask] = len(categories)
    categories.append(cat)
    image[mask] = _thing_pixels(rng, cat, xx[mask], yy[mask])

  image += rng.normal(0.0, 3.0, image.shape)  # sensor noise, so flat colours are not exact
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)

  # Remove segments that are (almost) invisible; the rest get random ids in [1, 2**24).
  areas = np.bincount(slot.ravel(), minlength=len(categories))
  keep = [k for k in range(len(categories)) if areas[k] >= min_area]
  ids = _unique_ids(rng, len(keep))
  lookup = np.zeros(len(categories), np.int32)  # removed segments -> void
  lookup[keep] = ids
  segments = [
    {"id": int(i), "category_id": categories[k], "area": int(areas[k]), "iscrowd": False}
    for i, k in zip(ids, keep, strict=True)
  ]
  return {"image": image, "panoptic": lookup[slot], "segments": segments}


def _region_layout(rng, u, v, num_regions: int) -> np.ndarray:
  """`[H, W]` int region index: bands along a random direction, with a sinusoidal wobble.

  Args:
    rng: numpy Generator.
    u: `[H, W]` normalised x of the pixel centres in (0, 1).
    v: `[H, W]` normalised y.
    num_regions: number of bands (1..3).
  """
  # Always draw the same numbers so that the stream of random draws does not depend on n.
  theta, amplitude, freq, phase = rng.uniform((0, 0, 0.5, 0), (np.pi, 0.08, 2.0, 2 * np.pi))
  shares = MIN_REGION_FRACTION + (1 - MIN_REGION_FRACTION * num_regions) * rng.dirichlet(
    np.ones(num_regions)
  )
  along = u * np.cos(theta) + v * np.sin(theta)
  across = -u * np.sin(theta) + v * np.cos(theta)
  field = along + amplitude * np.sin(2 * np.pi * freq * across + phase)
  # Cut at quantiles so each band gets its share of the pixels.
  cuts = np.quantile(field, np.cumsum(shares)[:-1])
  return np.searchsorted(cuts, field).astype(np.int32)


def _class_colour(rng, cat: int, jitter: float) -> np.ndarray:
  """RGB in [0, 255] of the class's hue/saturation/value with random jitter."""
  hue, sat, val = _APPEARANCE[cat]
  hue = (hue + rng.uniform(-0.03, 0.03)) % 1.0
  sat = np.clip(sat + rng.uniform(-jitter, jitter), 0, 1)
  val = np.clip(val + rng.uniform(-jitter, jitter), 0, 1)
  return 255.0 * np.array(colorsys.hsv_to_rgb(hue, sat, val), np.float32)


def _stuff_pixels(rng, cat: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """`[N, 3]` colours of one background region's pixels at centres `x`, `y` (`[N]` each)."""
  colour = _class_colour(rng, cat, jitter=0.1)
  if cat == 10:  # sky: brighter towards the top
    shade = 1.1 - 0.25 * y / max(float(y.max()), 1.0)
  elif cat == 11:  # grass: coarse per-pixel noise
    shade = 1.0 + 0.18 * rng.standard_normal(x.shape)
  else:  # wall: bricks, i.e. dark mortar lines with a half-brick offset every other row
    brick_h, brick_w = rng.uniform(5, 9), rng.uniform(10, 16)
    row = np.floor(y / brick_h)
    mortar = (y % brick_h < 1.0) | ((x + 0.5 * brick_w * (row % 2)) % brick_w < 1.0)
    shade = np.where(mortar, 0.6, 1.0)
  return np.clip(colour * shade[:, None], 0, 255)


def _thing_pixels(rng, cat: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """`[N, 3]` colours of one instance's pixels: class colour times a random texture."""
  colour = _class_colour(rng, cat, jitter=0.15)
  texture = int(rng.integers(3))
  period, direction = rng.uniform(3, 8), rng.uniform(0, np.pi)
  if texture == 0:  # flat
    shade = np.ones(x.shape, np.float32)
  elif texture == 1:  # stripes
    phase = (x * np.cos(direction) + y * np.sin(direction)) / period
    shade = np.where(phase % 1.0 < 0.5, 1.0, 0.7)
  else:  # noise
    shade = 1.0 + 0.15 * rng.standard_normal(x.shape)
  return np.clip(colour * shade[:, None], 0, 255)


def _shape_mask(rng, cat: int, xx, yy, centre, radius: float, angle: float) -> np.ndarray:
  """`[H, W]` bool mask of one thing of class `cat` with circumradius `radius`."""
  cx, cy = centre
  if cat in (1, 5):  # circle, ring
    dist = np.hypot(xx - cx, yy - cy)
    mask = dist <= radius
    if cat == 5:
      mask &= dist >= radius * rng.uniform(0.45, 0.65)
    return mask
  # Star: ten vertices alternating between outer and inner radius; square, triangle: regular.
  radii = np.tile([radius, 0.45 * radius], 5) if cat == 7 else np.full(4 if cat == 2 else 3, radius)
  theta = angle + 2 * np.pi * np.arange(len(radii)) / len(radii)
  return _polygon_mask(xx, yy, cx + radii * np.cos(theta), cy + radii * np.sin(theta))


def _polygon_mask(xx, yy, vx, vy) -> np.ndarray:
  """`[H, W]` even-odd point-in-polygon test of the pixel centres (any simple polygon)."""
  inside = np.zeros(xx.shape, bool)
  for x1, y1, x2, y2 in zip(vx, vy, np.roll(vx, -1), np.roll(vy, -1), strict=True):
    if y1 == y2:  # a horizontal edge never crosses a horizontal ray
      continue
    crosses = (y1 > yy) != (y2 > yy)
    x_at = x1 + (yy - y1) * (x2 - x1) / (y2 - y1)
    inside ^= crosses & (xx < x_at)
  return inside


def _unique_ids(rng, n: int) -> np.ndarray:
  """`n` distinct random segment ids in `[1, 2**24)` (all three RGB channels get used)."""
  while True:
    ids = rng.integers(1, 2**24, size=n)
    if len(np.unique(ids)) == n:
      return ids.astype(np.int32)
