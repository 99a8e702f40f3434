"""TFDS builders of COCO 2017: `coco_panoptic` (133 classes) and `coco_instance` (80 things).

Importing this module registers both builders, so `tfds.builder("coco_panoptic", data_dir=...)`
finds a prepared copy. `python -m mpformer_jax.data.prepare --dataset coco_panoptic ...` (or
`prepare.prepare`) builds one from the raw COCO files (ArrayRecord, no TF needed).

Both store the layout of `synthetic_shapes`, which the pipeline reads:

- `image`: uint8 `[H, W, 3]`; the original JPEG bytes, or lossless PNG of the RGB conversion
  of other images (e.g. CMYK), as `raw_io.read_image` decides (the report lists them); the
  builders check the image size against the JSON and the annotation;
- `panoptic`: uint8 `[H, W, 3]` PNG in COCO's RGB id encoding (id = R + 256 G + 256**2 B, 0 =
  void);
- `image_id`: int64, COCO's image id; `file_name`: text, e.g. `"val2017/000000000139.jpg"`;
- `segments`: sequence of `{id, category_id, area, iscrowd}`.

`coco_panoptic` copies the official panoptic PNG and `segments_info` through, after checking
that they agree (every PNG id listed, every listed segment present, known categories, equal
sizes).

`coco_instance` rasterises `instances_*2017.json` (polygons, uncompressed RLE of crowd regions,
compressed RLE) into one id map. Masks there may overlap, which one id map cannot hold, so:

- crowd annotations are painted first (under every non-crowd one): `targets.py` ignores their
  pixels, as Mask2Former drops crowd annotations, but they are kept for evaluation;
- where masks overlap, the smaller one (by rasterised pixel count) wins; at equal size the later
  annotation in the JSON wins. The pixels an instance loses are counted (`overlap_pixels`, per
  image in `overlap_images`), and instances left without a pixel are dropped and counted
  (`hidden_instances`);
- annotations whose mask is empty (e.g. only degenerate polygons of fewer than 3 points,
  which detectron2 also discards) are dropped and counted (`empty_instances`);
- segment ids are 1..N in JSON order, `area` is the pixel count in the final map.

Images without annotations are kept in both datasets (with no segments). Mask2Former's instance
training filters them out of its training set; here `targets.py` gives them no targets.

Bad data (unreadable image, missing or inconsistent annotation, unknown category, size
mismatch) raises `raw_io.BadExampleError` (a `ValueError`) naming the file; with `skip_bad=True`
the example is skipped and listed in the build report (`raw_io.BuildReport`; build with
`prepare.prepare`). The report's `counts` of `coco_instance` hold the overlap statistics above:
`empty_instances`, `hidden_instances`, `overlap_pixels`, `overlap_images` (`[file, pixels]`
pairs) and `crowd_pixels_covered`; those of `coco_panoptic` are empty.
"""

from __future__ import annotations

import collections
import functools
import os

import numpy as np
import tensorflow_datasets as tfds
from pycocotools import mask as mask_util

from mpformer_jax.data import coco_categories, panoptic_png, raw_io
from mpformer_jax.data.raw_io import BadExampleError, RawDataError

PANOPTIC_NAME = "coco_panoptic"
INSTANCE_NAME = "coco_instance"
# TFDS split -> COCO's folder and file-name suffix.
SPLITS = {"train": "train2017", "validation": "val2017"}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download COCO 2017 from https://cocodataset.org/#download into one directory RAW (pass it as
`--manual_dir RAW` to `python -m mpformer_jax.data.prepare`) and unzip it:

  RAW/train2017/*.jpg                           (train2017.zip)
  RAW/val2017/*.jpg                             (val2017.zip)
  RAW/annotations/instances_{train,val}2017.json
                                                (annotations_trainval2017.zip; coco_instance)
  RAW/annotations/panoptic_{train,val}2017.json (panoptic_annotations_trainval2017.zip)
  RAW/annotations/panoptic_{train,val}2017/*.png

The panoptic PNGs come zipped a second time, as annotations/panoptic_train2017.zip and
annotations/panoptic_val2017.zip inside the panoptic archive: unzip both in RAW/annotations so
that the two PNG folders above exist. coco_panoptic reads the panoptic files and the images,
coco_instance the instances files and the images.
"""


# ---------------------------------------------------------------------------------------------
# Reading and checking raw files.


def _check_categories(path, json_categories, table) -> None:
  """The file's categories must carry our table's names: another file would mislabel silently."""
  ours = {c["id"]: c["name"] for c in table}
  wrong = [
    (c["id"], c["name"], ours[c["id"]])
    for c in json_categories
    if c["id"] in ours and c["name"] != ours[c["id"]]
  ]
  if wrong:
    raise RawDataError(path, f"category names differ from the COCO table (id, file, ours): {wrong}")


def _read_image(path, expected_hw) -> raw_io.StoredImage:
  """The stored image (`raw_io.read_image`), checked against the JSON's `(height, width)`."""
  image = raw_io.read_image(path)
  if image.size != tuple(expected_hw):
    h, w = image.size
    raise BadExampleError(path, f"image is {h}x{w} but the annotation JSON says {expected_hw}")
  return image


def _read_panoptic_png(path) -> tuple[bytes, np.ndarray]:
  """PNG bytes (RGB) and int32 `[H, W]` segment ids of a panoptic annotation file."""
  data, image = raw_io.decode(path, "panoptic PNG")
  rgb = np.asarray(image.convert("RGB"))
  # An 8-bit RGB PNG is kept as it is (PIL would read a 16-bit one as 8-bit RGB, OpenCV not).
  is_rgb_png = image.format == "PNG" and image.mode == "RGB" and data[24] == 8
  return (data if is_rgb_png else panoptic_png.encode_png(rgb)), panoptic_png.rgb_to_id(rgb)


def _rasterise(segmentation, hw: tuple[int, int], file: str, what: str) -> np.ndarray:
  """bool `[H, W]` mask of a COCO `segmentation` (polygons, uncompressed or compressed RLE).

  Polygons with fewer than 3 points are ignored (detectron2 drops them too), so a mask may be
  empty.

  Raises:
    BadExampleError: naming `file` (and `what`, the annotation) for an unknown format or an
      RLE that does not fit the image.
  """
  h, w = hw
  if isinstance(segmentation, list):
    polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
    if not polygons:
      return np.zeros((h, w), bool)
    rle = mask_util.merge(mask_util.frPyObjects(polygons, h, w))
  elif isinstance(segmentation, dict) and {"counts", "size"} <= set(segmentation):
    if [int(s) for s in segmentation["size"]] != [h, w]:
      size = segmentation["size"]
      raise BadExampleError(file, f"{what}: RLE size {size} is not the image's {[h, w]}")
    counts = segmentation["counts"]
    if isinstance(counts, list):
      # pycocotools leaves a short run list's tail as background: require the exact total.
      if sum(counts) != h * w:
        raise BadExampleError(file, f"{what}: RLE counts sum to {sum(counts)}, not {h}*{w}")
      rle = mask_util.frPyObjects(segmentation, h, w)
    else:
      rle = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
  else:
    kind = type(segmentation).__name__
    raise BadExampleError(file, f"{what}: unknown segmentation format ({kind})")
  try:
    return mask_util.decode(rle).astype(bool)
  except ValueError as e:  # pycocotools rejects runs that overflow the image
    raise BadExampleError(file, f"{what}: invalid RLE ({e})") from e


def paint_instances(
  masks: list[np.ndarray], iscrowd: list[bool], hw: tuple[int, int]
) -> tuple[np.ndarray, dict]:
  """One id map of possibly overlapping masks (rules in the module docstring).

  Args:
    masks: N bool `[H, W]` masks in JSON order.
    iscrowd: N crowd flags.
    hw: `(H, W)`.

  Returns:
    `(canvas, stats)`: int32 `[H, W]` map of `1 + index` into `masks` (0 = no instance), and
    `{"area": int64 [N] pixel counts in the map, "overlap_pixels": non-crowd pixels painted
    over, "crowd_pixels_covered": crowd pixels painted over}`.
  """
  n = len(masks)
  areas = np.array([int(m.sum()) for m in masks], np.int64)
  crowd = np.asarray(iscrowd, bool).reshape(n)
  # Painted later wins: crowd first, then larger before smaller (stable, so JSON order at ties).
  order = sorted(range(n), key=lambda k: (not crowd[k], -areas[k]))
  canvas = np.zeros(hw, np.int32)
  for k in order:
    canvas[masks[k]] = k + 1
  final = np.bincount(canvas.ravel(), minlength=n + 1)[1:].astype(np.int64)
  lost = areas - final
  return canvas, {
    "area": final,
    "overlap_pixels": int(lost[~crowd].sum()),
    "crowd_pixels_covered": int(lost[crowd].sum()),
  }


# ---------------------------------------------------------------------------------------------
# Builders.


class _CocoBuilder(raw_io.RawBuilder, skip_registration=True):
  """The COCO builders' splits; subclasses yield `raw_io.Record`s from `_records`."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  SPLITS = SPLITS
  # Declared JPEG for the original bytes; converted images are PNG, which decoders sniff.
  IMAGE_FORMAT = "jpeg"


def _fail(file, problem: str):
  raise BadExampleError(file, problem)


def _image_records(images: list[dict], split_dir: str):
  """`(image, relative file name)` of each JSON image; a repeated id is a bad record."""
  seen = set()
  for image in images:
    rel = f"{split_dir}/{image['file_name']}"
    if image["id"] in seen:
      yield image, rel, functools.partial(_fail, rel, f"image id {image['id']} is repeated")
    else:
      seen.add(image["id"])
      yield image, rel, None


class CocoPanoptic(_CocoBuilder):
  """COCO 2017 panoptic segmentation (`panoptic_{train,val}2017`), 133 categories."""

  def _records(self, root, split_dir):
    root = os.fspath(root)
    json_path = os.path.join(root, "annotations", f"panoptic_{split_dir}.json")
    png_dir = os.path.join(root, "annotations", f"panoptic_{split_dir}")
    data = raw_io.load_json(json_path)
    _check_categories(json_path, data.get("categories", []), coco_categories.PANOPTIC_CATEGORIES)
    known = {c["id"] for c in coco_categories.PANOPTIC_CATEGORIES}
    image_ids = {image["id"] for image in data["images"]}
    annotations = collections.defaultdict(list)
    for ann in data["annotations"]:
      annotations[ann["image_id"]].append(ann)
      if ann["image_id"] not in image_ids:
        png = os.path.join(png_dir, ann["file_name"])
        problem = f"annotation of image_id {ann['image_id']}, which {json_path} does not list"
        yield f"orphan/{ann['file_name']}", png, functools.partial(_fail, png, problem)
    for image, rel, bad in _image_records(data["images"], split_dir):
      path = os.path.join(root, rel)
      anns = annotations.get(image["id"], [])
      if bad is None and len(anns) != 1:
        bad = functools.partial(
          _fail, path, f"{len(anns)} entries in {json_path} annotations (expected 1)"
        )
      make = bad or functools.partial(
        self._example, path, rel, image, os.path.join(png_dir, anns[0]["file_name"]), anns[0], known
      )
      yield image["id"], rel, make

  @staticmethod
  def _example(path, rel, image, png_path, ann, known) -> tuple[dict, dict]:
    hw = (int(image["height"]), int(image["width"]))
    stored = _read_image(path, hw)
    png_bytes, ids = _read_panoptic_png(png_path)
    if ids.shape != hw:
      raise BadExampleError(png_path, f"panoptic PNG is {ids.shape} but the image is {hw}")
    infos = ann.get("segments_info", [])
    listed = [int(s["id"]) for s in infos]
    if len(set(listed)) != len(listed) or any(i <= 0 for i in listed):
      raise BadExampleError(png_path, f"segment ids must be unique and >= 1: {listed}")
    unknown = sorted({int(s["category_id"]) for s in infos} - known)
    if unknown:
      raise BadExampleError(png_path, f"unknown category ids {unknown}")
    present = set(np.unique(ids).tolist()) - {0}
    unlisted, absent = sorted(present - set(listed)), sorted(set(listed) - present)
    if unlisted:
      raise BadExampleError(png_path, f"PNG ids {unlisted} are not in segments_info")
    if absent:
      raise BadExampleError(png_path, f"segments_info ids {absent} do not occur in the PNG")
    segments = [
      {
        "id": int(s["id"]),
        "category_id": int(s["category_id"]),
        "area": int(s["area"]),
        "iscrowd": bool(s.get("iscrowd", 0)),
      }
      for s in infos
    ]
    example = {
      "image": stored.data,
      "panoptic": png_bytes,
      "image_id": int(image["id"]),
      "file_name": rel,
      "segments": segments,
    }
    return example, {"reencoded": stored.reencoded}


class CocoInstance(_CocoBuilder):
  """COCO 2017 instance segmentation (`instances_{train,val}2017`), 80 thing categories."""

  # The report's overlap statistics (module docstring).
  COUNTS = {
    "empty_instances": 0,
    "hidden_instances": 0,
    "overlap_pixels": 0,
    "overlap_images": [],
    "crowd_pixels_covered": 0,
  }

  def _records(self, root, split_dir):
    root = os.fspath(root)
    json_path = os.path.join(root, "annotations", f"instances_{split_dir}.json")
    data = raw_io.load_json(json_path)
    _check_categories(json_path, data.get("categories", []), coco_categories.INSTANCE_CATEGORIES)
    known = {c["id"] for c in coco_categories.INSTANCE_CATEGORIES}
    image_ids = {image["id"] for image in data["images"]}
    annotations = collections.defaultdict(list)
    for ann in data["annotations"]:
      annotations[ann["image_id"]].append(ann)
      if ann["image_id"] not in image_ids:
        problem = f"annotation {ann.get('id')} refers to image_id {ann['image_id']}, not listed"
        yield f"orphan/{ann.get('id')}", json_path, functools.partial(_fail, json_path, problem)
    for image, rel, bad in _image_records(data["images"], split_dir):
      make = bad or functools.partial(
        self._example, root, rel, image, annotations.get(image["id"], []), known, json_path
      )
      yield image["id"], rel, make

  @staticmethod
  def _example(root, rel, image, anns, known, json_path) -> tuple[dict, dict]:
    path = os.path.join(root, rel)
    hw = (int(image["height"]), int(image["width"]))
    stored = _read_image(path, hw)
    masks, kept = [], []
    for ann in anns:
      what = f"annotation {ann.get('id')} of {json_path}"
      if int(ann["category_id"]) not in known:
        raise BadExampleError(path, f"{what}: unknown category id {ann['category_id']}")
      if "segmentation" not in ann:
        raise BadExampleError(path, f"{what}: no segmentation")
      mask = _rasterise(ann["segmentation"], hw, path, what)
      if mask.any():
        masks.append(mask)
        kept.append(ann)
    canvas, painted = paint_instances(masks, [bool(a.get("iscrowd", 0)) for a in kept], hw)
    # Renumber the instances that kept pixels to 1..N, in JSON order.
    visible = np.flatnonzero(painted["area"] > 0)
    new_id = np.zeros(len(masks) + 1, np.int32)
    new_id[visible + 1] = np.arange(1, len(visible) + 1)
    segments = [
      {
        "id": j + 1,
        "category_id": int(kept[k]["category_id"]),
        "area": int(painted["area"][k]),
        "iscrowd": bool(kept[k].get("iscrowd", 0)),
      }
      for j, k in enumerate(visible)
    ]
    example = {
      "image": stored.data,
      "panoptic": panoptic_png.encode_png(panoptic_png.id_to_rgb(new_id[canvas])),
      "image_id": int(image["id"]),
      "file_name": rel,
      "segments": segments,
    }
    overlap = painted["overlap_pixels"]
    stats = {
      "reencoded": stored.reencoded,
      "empty_instances": len(anns) - len(kept),
      "hidden_instances": len(kept) - len(visible),
      "overlap_pixels": overlap,
      "overlap_images": [[rel, overlap]] if overlap else [],
      "crowd_pixels_covered": painted["crowd_pixels_covered"],
    }
    return example, stats


BUILDERS = {PANOPTIC_NAME: CocoPanoptic, INSTANCE_NAME: CocoInstance}
