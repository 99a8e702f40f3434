"""What the builders of real datasets share: bad-data errors, file readers, the build report.

Every raw-data builder (`coco_builder`, `ade20k_builder`, `cityscapes_builder`) subclasses
`RawBuilder`, which applies one policy to bad data and keeps one kind of report:

- a bad example (unreadable image, missing or inconsistent annotation, unknown category,
  mismatched sizes) raises `BadExampleError`, a `ValueError` naming the offending file. With
  `skip_bad=True` the example is left out instead, logged and listed in the report;
- a problem with the whole dataset (a missing annotation file or split directory, another
  dataset's category names) raises `RawDataError` whatever `skip_bad` is;
- the `BuildReport` (examples and skipped examples per split, images stored re-encoded, counts
  of the dataset's own) is written next to the prepared data as `build_report.json`, so a later
  reader (`builder.report`, `prepare.prepare`) gets the report of the build that made the data.

Images keep their original bytes when every decoder reads them the same way: 8-bit RGB or
grayscale JPEG and PNG files (TFDS decodes them with OpenCV or PIL, and repeats a grayscale
channel three times, as detectron2's `read_image(format="RGB")` does). Anything else (CMYK or
palette images, alpha channels, 16-bit PNGs) is converted by PIL to RGB, as that reader does,
and stored as lossless PNG; the report lists these files. EXIF orientation is not applied, so
pixels stay in the annotations' frame.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from mpformer_jax.data import panoptic_png

# The build report's file, in the prepared data's version directory.
REPORT_FILE = "build_report.json"
# What PIL raises on unreadable or truncated files.
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# PIL modes of single-channel label images ("P" holds palette indices, which are the labels).
LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RawDataError(ValueError):
  """The raw data cannot be built; `file` is the offending file, `problem` what is wrong."""

  def __init__(self, file, problem: str):
    self.file, self.problem = str(file), problem
    super().__init__(f"{self.file}: {problem}")


class BadExampleError(RawDataError):
  """One unusable example (skipped under `skip_bad`); `file` and `problem` as `RawDataError`."""


# ---------------------------------------------------------------------------------------------
# Readers.


def load_json(path) -> Any:
  """A whole annotation file; a missing or malformed one fails the build (not one example).

  Raises:
    RawDataError: naming `path`.
  """
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise RawDataError(path, f"cannot read the annotation file ({e})") from e


def decode(path, what: str) -> tuple[bytes, Image.Image]:
  """The bytes of an image file and PIL's image of them, fully decoded.

  Args:
    path: the file.
    what: what it is, for error messages ("image", "annotation", ...).

  Returns:
    `(data, image)`; `image.format` and `image.mode` describe the file.

  Raises:
    BadExampleError: "cannot read the <what>" for a missing or unreadable file, "corrupt or
      unreadable <what>" if it does not fully decode (truncated and corrupt files only fail in
      the full decode).
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise BadExampleError(path, f"cannot read the {what} ({e})") from e
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except READ_ERRORS as e:
    raise BadExampleError(path, f"corrupt or unreadable {what} ({e})") from e
  return data, image


class StoredImage(NamedTuple):
  """An image as stored: `data` (bytes), `size` `(H, W)`, `reencoded` (not the file's bytes)."""

  data: bytes
  size: tuple[int, int]
  reencoded: bool


def _keeps_bytes(data: bytes, image: Image.Image) -> bool:
  """Whether every decoder reads `data` as the RGB image detectron2 would (module docstring)."""
  if image.mode not in ("RGB", "L"):
    return False
  if image.format == "JPEG":
    return True
  # PIL reads 16-bit RGB PNGs as 8-bit "RGB", OpenCV as uint16: the IHDR's bit depth decides.
  return image.format == "PNG" and data[:8] == _PNG_SIGNATURE and data[24] == 8


def read_image(path) -> StoredImage:
  """The stored form of an image file: its own bytes or lossless PNG of its RGB conversion.

  Raises:
    BadExampleError: naming `path` if it is missing, unreadable or does not fully decode.
  """
  data, image = decode(path, "image")
  size = (image.height, image.width)
  if _keeps_bytes(data, image):
    return StoredImage(data, size, False)
  try:
    rgb = np.asarray(image.convert("RGB"))
  except READ_ERRORS as e:
    raise BadExampleError(path, f"corrupt or unreadable image ({e})") from e
  return StoredImage(panoptic_png.encode_png(rgb), size, True)


def read_label(path, what: str = "annotation") -> np.ndarray:
  """int64 `[H, W]` values of a single-channel (8-, 16- or 32-bit) label PNG.

  Raises:
    BadExampleError: naming `path` if it cannot be read or has more than one channel.
  """
  _, image = decode(path, what)
  if image.mode not in LABEL_MODES:
    mode = image.mode
    raise BadExampleError(path, f"expected a single-channel {what} PNG, got PIL mode {mode}")
  return np.asarray(image).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The build report.


def _jsonable(value):
  """`value` as JSON gives it back (tuples become lists), so stored reports compare equal."""
  return json.loads(json.dumps(value))


@dataclasses.dataclass
class BuildReport:
  """What a build wrote, skipped and converted; the same fields for every dataset.

  Attributes:
    dataset: the builder's name.
    skip_bad: whether bad examples were skipped (else the build failed on the first).
    examples: split -> examples written.
    skipped: `(file, reason)` of every skipped example, in build order; `file` is the
      offending file (image, annotation PNG or JSON).
    skipped_per_split: split -> examples skipped.
    reencoded_images: images stored as converted PNG instead of their own bytes, as the
      examples' `file_name`.
    counts: the dataset's own statistics (e.g. COCO instance overlaps, see its builder): ints
      (summed over examples) and lists (concatenated).
  """

  dataset: str
  skip_bad: bool = False
  examples: dict[str, int] = dataclasses.field(default_factory=dict)
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  skipped_per_split: dict[str, int] = dataclasses.field(default_factory=dict)
  reencoded_images: list[str] = dataclasses.field(default_factory=list)
  counts: dict[str, Any] = dataclasses.field(default_factory=dict)

  def start_split(self, split: str) -> None:
    self.examples[split] = 0
    self.skipped_per_split[split] = 0

  def add_example(self, split: str, file: str, stats: dict) -> None:
    """Counts one written example; `stats` may hold "reencoded" and keys of `counts`."""
    self.examples[split] += 1
    for key, value in stats.items():
      if key == "reencoded":
        if value:
          self.reencoded_images.append(file)
      elif isinstance(value, list):
        self.counts[key].extend(_jsonable(value))
      else:
        self.counts[key] += value

  def add_skipped(self, split: str, error: BadExampleError) -> None:
    self.skipped.append((error.file, error.problem))
    self.skipped_per_split[split] += 1

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)

  @classmethod
  def from_json(cls, text: str) -> BuildReport:
    fields = json.loads(text)
    fields["skipped"] = [tuple(item) for item in fields["skipped"]]
    return cls(**fields)

  def save(self, directory) -> None:
    with open(os.path.join(directory, REPORT_FILE), "w", encoding="utf-8") as f:
      f.write(self.to_json())

  @classmethod
  def load(cls, directory) -> BuildReport | None:
    """The report stored in `directory`, or None if there is none."""
    path = os.path.join(directory, REPORT_FILE)
    if not os.path.exists(path):
      return None
    with open(path, encoding="utf-8") as f:
      return cls.from_json(f.read())


# ---------------------------------------------------------------------------------------------
# The builders' base class.

# `(split, done, total)`, called after each raw record of a split (written or skipped).
ProgressFn = Callable[[str, int, int], None]
# What `RawBuilder._records` yields: `(key, file, make)`; `make()` returns `(example, stats)` or
# raises `BadExampleError`; `file` names the example in the report (its `file_name`).
Record = tuple[Any, str, Callable[[], tuple[dict, dict]]]


def features(image_format: str | None, semantic: bool = False) -> tfds.features.FeaturesDict:
  """The features of every dataset (`synthetic_builder`'s, plus `file_name`).

  Args:
    image_format: the `image` feature's declared encoding. It matters only for encoding arrays
      (the builders store bytes); decoders detect the format, so converted PNGs read back too.
    semantic: add `semantic`, uint8 `[H, W, 1]` category ids (0 = void): the semantic ground
      truth of a dataset whose semantic annotation is not its panoptic map merged by class
      (`pipeline` scores the semantic metrics against it).
  """
  values = {
    "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
    "panoptic": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
    "image_id": np.int64,
    "file_name": tfds.features.Text(),
    "segments": tfds.features.Sequence(
      {"id": np.int64, "category_id": np.int64, "area": np.int64, "iscrowd": np.bool_}
    ),
  }
  if semantic:
    values["semantic"] = tfds.features.Image(shape=(None, None, 1), encoding_format="png")
  return tfds.features.FeaturesDict(values)


class RawBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder from raw files in `dl_manager.manual_dir`, with the bad-data policy and report.

  Subclasses set `VERSION`, `MANUAL_DOWNLOAD_INSTRUCTIONS`, `SPLITS` (TFDS split -> raw split
  name, passed to `_records`), `IMAGE_FORMAT` and `COUNTS` (initial values of the report's
  dataset-specific `counts`), and implement `_records(root, raw_split) -> Iterable[Record]`.
  Records are listed before any is read, so the progress callback knows each split's total.
  """

  SPLITS: dict[str, str] = {}
  IMAGE_FORMAT: str | None = None
  SEMANTIC = False  # whether examples carry the `semantic` feature (see `features`)
  COUNTS: dict[str, Any] = {}
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # TFDS derives the location of a builder's checksum file through `importlib_resources`, a
  # package it only declares for Python < 3.9, and fails without it. Naming a file directly
  # skips that lookup (these builders download nothing, so they have no checksums).
  code_path = tfds.core.Path(__file__)

  def __init__(self, *, skip_bad: bool = False, progress: ProgressFn | None = None, **kwargs):
    """Creates the builder.

    Args:
      skip_bad: skip bad examples (logged and listed in `report`) instead of raising.
      progress: called as `progress(split, done, total)` while building.
      **kwargs: `tfds.core.GeneratorBasedBuilder` arguments (`data_dir`, `file_format`, ...).
    """
    self.skip_bad = bool(skip_bad)
    self._progress = progress
    self._report = None
    super().__init__(**kwargs)

  @property
  def report(self) -> BuildReport | None:
    """The report of the build that made this data (this object's, or the stored one).

    None for data without a stored report (not prepared, or prepared by other means).
    """
    if self._report is None:
      self._report = BuildReport.load(self.data_dir)
    return self._report

  def _info(self) -> tfds.core.DatasetInfo:
    # Records stay in the raw data's order, so eval indices follow the annotation files.
    return tfds.core.DatasetInfo(
      builder=self, features=features(self.IMAGE_FORMAT, self.SEMANTIC), disable_shuffling=True
    )

  def _download_and_prepare(self, dl_manager, download_config=None):
    counts = {k: list(v) if isinstance(v, list) else v for k, v in self.COUNTS.items()}
    self._report = BuildReport(dataset=self.name, skip_bad=self.skip_bad, counts=counts)
    super()._download_and_prepare(dl_manager, download_config)
    # `self.data_dir` is still the incomplete directory here, so the report moves with the data.
    self._report.save(self.data_dir)
    r = self._report
    logging.info("%s: %s examples, %s skipped", self.name, r.examples, r.skipped_per_split)

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    return {split: self._generate_examples(root, split) for split in self.SPLITS}

  def _generate_examples(self, root, split: str):
    records = list(self._records(root, self.SPLITS[split]))
    report = self._report
    report.start_split(split)
    for done, (key, file, make) in enumerate(records, 1):
      try:
        example, stats = make()
      except BadExampleError as error:
        if not self.skip_bad:
          raise
        logging.warning("%s: skipping %s", self.name, error)
        report.add_skipped(split, error)
        example = None
      else:
        report.add_example(split, file, stats)
      if self._progress is not None:
        self._progress(split, done, len(records))
      if example is not None:
        yield key, example

  def _records(self, root, raw_split: str) -> Iterable[Record]:
    raise NotImplementedError


def release_tfds_name(name: str) -> None:
  """Unregisters TFDS' own builder called `name`, if TFDS has loaded it, so ours can register.

  TFDS loads its built-in builders on demand (any `tfds.builder` call of a name not registered
  yet may load them all); a builder of ours with the same name registered after that fails with
  "already registered". Only builders shipped in the `tensorflow_datasets` package are removed.
  """
  # Private TFDS state: without it (another TFDS version) registration just fails as before.
  from tensorflow_datasets.core import registered

  registry = getattr(registered, "_DATASET_REGISTRY", {})
  existing = registry.get(name)
  if existing is not None and existing.__module__.startswith("tensorflow_datasets."):
    del registry[name]
