"""TFDS' own coco/2017_panoptic and scene_parse150, read through the pipeline.

TFDS' real builders prepare the data from tiny archives in the official download layout, which
the download manager extracts itself instead of downloading (`_prepare_tfds`).
"""

from __future__ import annotations

import inspect
import io
import json
import os
import pickle
import re
import shlex
import sys
import tarfile
import types
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from mpformer_jax.data import (
  coco_categories,
  dataset_metadata,
  default_dataset_config,
  pipeline,
  sources,
  tfds_sources,
  validate_dataset_config,
)
from tests.raw_datasets import (
  ADE_BED,
  ADE_CHAIR,
  ADE_FLAG,
  ADE_PERSON,
  SIZE,
  H,
  W,
  ade_panoptic_annotation,
  write_coco_panoptic,
  write_json,
)

COCO, SCENE = "coco/2017_panoptic", "scene_parse150"
PAN_LABEL = {c["id"]: i for i, c in enumerate(coco_categories.PANOPTIC_CATEGORIES)}
COCO_THINGS = {c["id"] for c in coco_categories.PANOPTIC_CATEGORIES if c["isthing"]}
# Semantic classes of the instance classes the scenes use (the ADE20K table, typed here).
ADE_CLASS = {ADE_BED: 8, ADE_PERSON: 13, ADE_CHAIR: 20, ADE_FLAG: 150}


def _prepare_tfds(name: str, data_dir: str, archives: dict[str, str], file_format: str):
  """Prepares TFDS' own builder `name` into `data_dir` from local `archives`.

  `archives` maps the file name of each URL the builder asks for (e.g. "val2017.zip") to a
  local archive, which TFDS' download manager then extracts as it would the download.
  """

  def download_and_extract(self, url_or_urls):
    return self.extract({k: archives[url.rsplit("/", 1)[1]] for k, url in url_or_urls.items()})

  builder = tfds.builder(name, data_dir=data_dir)
  cls = type(builder)
  # TFDS finds a builder's checksum file through `importlib_resources`, which it declares only
  # for Python < 3.9 (tensorflow/datasets#11212); naming the code's file skips that lookup.
  # (Not with monkeypatch: reading the old value would run the failing lookup.)
  patched = "code_path" not in vars(cls)
  if patched:
    cls.code_path = epath.Path(inspect.getfile(cls))
  try:
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(tfds.download.DownloadManager, "download_and_extract", download_and_extract)
      builder.download_and_prepare(
        file_format=file_format, download_config=tfds.download.DownloadConfig()
      )
  finally:
    if patched:
      del cls.code_path
  return builder


def _zip(path: str, root: str, members) -> str:
  """A zip at `path` of `members` (files, or directories with their files) relative to `root`."""
  with zipfile.ZipFile(path, "w") as archive:
    for member in members:
      full = os.path.join(root, member)
      names = sorted(os.listdir(full)) if os.path.isdir(full) else [None]
      for name in names:
        rel = member if name is None else os.path.join(member, name)
        archive.write(os.path.join(root, rel), rel)
  return path


def _config(name: str, data_dir: str, task: str, num_classes: int, **fields):
  config = default_dataset_config()
  config.name, config.data_dir, config.task, config.num_classes = name, data_dir, task, num_classes
  config.eval_size, config.crop_size = (32, 64), (32, 32)  # the images are 32 x 48
  config.max_gt, config.eval_max_segments = 8, 8
  for key, value in fields.items():
    setattr(config, key, value)
  return config


def _eval_batch(config, size: int) -> dict:
  (batch,) = list(pipeline.create_eval_loader(config, size, process_index=0, process_count=1))
  return batch


def _train_batch(config) -> dict:
  loader = pipeline.create_train_loader(config, 2, seed=0, process_index=0, process_count=1)
  return next(loader)


# ---------------------------------------------------------------------------------------------
# coco/2017_panoptic.


def _coco_downloads(raw: str, out: str) -> dict[str, str]:
  """The archives TFDS' coco/2017_panoptic downloads, made from our raw COCO panoptic files.

  `{train,val}2017.zip` hold `{split}/*.jpg`; `panoptic_annotations_trainval2017.zip` holds
  `annotations/panoptic_{split}.json` and `annotations/panoptic_{split}.zip`, whose PNGs are in
  `panoptic_{split}/` (the official files' layout).
  """
  annotations = os.path.join(raw, "annotations")
  members = []
  for split in ("train2017", "val2017"):
    _zip(os.path.join(out, f"{split}.zip"), raw, [split])
    _zip(os.path.join(annotations, f"panoptic_{split}.zip"), annotations, [f"panoptic_{split}"])
    members += [f"annotations/panoptic_{split}.json", f"annotations/panoptic_{split}.zip"]
  _zip(os.path.join(out, "panoptic_annotations_trainval2017.zip"), raw, members)
  return {name: os.path.join(out, name) for name in os.listdir(out)}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
  raw = str(tmp_path_factory.mktemp("coco_raw"))
  scenes = write_coco_panoptic(raw)
  archives = _coco_downloads(raw, str(tmp_path_factory.mktemp("coco_downloads")))
  data_dir = str(tmp_path_factory.mktemp("coco_tfds"))
  _prepare_tfds(COCO, data_dir, archives, "array_record")
  return raw, data_dir, scenes


def test_coco_elements_in_our_layout(coco):
  raw, data_dir, scenes = coco
  for split, split_dir in (("validation", "val2017"), ("train", "train2017")):
    config = _config(COCO, data_dir, "panoptic", 133, eval_split=split)
    source = sources.open_source(config, "eval_split")
    assert isinstance(source, tfds_sources.CocoPanopticSource)
    assert repr(source).startswith("CocoPanopticSource(ArrayRecordDataSource(name=coco")
    written = {image_id: (ids, segments) for image_id, _, ids, segments in scenes[split_dir]}
    assert len(source) == len(written)
    # TFDS orders records by a hash of their keys: find each image by its id.
    for index in range(len(source)):
      example = source[index]
      ids, segments = written.pop(int(example["image_id"]))
      name = f"{int(example['image_id']):012d}"
      assert example["file_name"] == f"{name}.jpg".encode()
      with Image.open(os.path.join(raw, split_dir, f"{name}.jpg")) as image:
        np.testing.assert_array_equal(example["image"], np.asarray(image))
      assert example["panoptic"].dtype == np.uint8 and example["panoptic"].shape == (H, W, 3)
      got = example["panoptic"].astype(np.int64) @ np.array([1, 256, 256**2])
      np.testing.assert_array_equal(got, ids)
      seg = example["segments"]
      assert seg["id"].tolist() == [s[0] for s in segments]
      assert seg["category_id"].tolist() == [s[1] for s in segments]
      assert seg["iscrowd"].tolist() == [bool(s[2]) for s in segments]
      assert seg["area"].tolist() == [int(np.sum(ids == s[0])) for s in segments]
    assert not written
    # grain's worker processes get the source pickled.
    again = pickle.loads(pickle.dumps(source))
    assert repr(again) == repr(source) and again[0]["image_id"] == source[0]["image_id"]


@pytest.mark.parametrize(
  ("task", "num_classes"), [("panoptic", 133), ("instance", 80), ("semantic", 133)]
)
def test_coco_eval_loader(coco, task, num_classes):
  _, data_dir, scenes = coco
  batch = _eval_batch(_config(COCO, data_dir, task, num_classes), 4)
  assert batch["is_real"].tolist() == [True, True, True, False]
  written = {image_id: (ids, segments) for image_id, _, ids, segments in scenes["val2017"]}
  assert sorted(batch["image_id"][:3].tolist()) == sorted(written)
  for b in range(3):
    ids, segments = written[int(batch["image_id"][b])]
    n = len(segments)
    seg_ids = np.array([s[0] for s in segments], int)
    categories = np.array([s[1] for s in segments], int)
    crowd = np.array([bool(s[2]) for s in segments], bool)
    isthing = np.isin(categories, list(COCO_THINGS))
    labels = np.array([PAN_LABEL[c] for c in categories], int)
    if task == "instance":  # things only: stuff has no label
      labels = np.where(isthing, labels, -1)
    np.testing.assert_array_equal(batch["panoptic"][b, :H, :W], ids)
    assert not batch["panoptic"][b, :, W:].any()
    np.testing.assert_array_equal(batch["gt_ids"][b, :n], seg_ids)
    np.testing.assert_array_equal(batch["gt_labels"][b, :n], labels)
    np.testing.assert_array_equal(batch["gt_iscrowd"][b, :n], crowd)
    np.testing.assert_array_equal(batch["gt_isthing"][b, :n], isthing)
    assert batch["gt_valid"][b].sum() == n
    # Training targets: crowd regions dropped except in the semantic task, stuff dropped in
    # the instance task, and one target per class in the semantic task.
    keep = ~crowd if task != "semantic" else np.ones(n, bool)
    if task == "instance":
      keep &= isthing
    valid = batch["valid"][b]
    if task == "semantic":
      assert sorted(batch["labels"][b, valid].tolist()) == sorted(set(labels[keep].tolist()))
    else:
      np.testing.assert_array_equal(batch["ids"][b, valid], seg_ids[keep])
      np.testing.assert_array_equal(batch["labels"][b, valid], labels[keep])


def test_coco_train_batch(coco):
  _, data_dir, _ = coco
  batch = _train_batch(_config(COCO, data_dir, "panoptic", 133))
  assert batch["image"].shape == (2, 32, 32, 3) and batch["segment_ids"].shape == (2, 32, 32)
  # The one train image holds grass (193) and a dog (18).
  assert batch["valid"].any()
  assert set(batch["labels"][batch["valid"]].tolist()) <= {PAN_LABEL[193], PAN_LABEL[18]}


def test_coco_unknown_category_name(tmp_path):
  raw = str(tmp_path / "raw")
  write_coco_panoptic(raw)
  for split in ("train2017", "val2017"):
    path = os.path.join(raw, "annotations", f"panoptic_{split}.json")
    with open(path) as f:
      data = json.load(f)
    data["categories"][5]["name"] = "omnibus"  # "bus"
    write_json(path, data)
  os.makedirs(tmp_path / "downloads")
  archives = _coco_downloads(raw, str(tmp_path / "downloads"))
  data_dir = str(tmp_path / "tfds")
  _prepare_tfds(COCO, data_dir, archives, "array_record")
  config = _config(COCO, data_dir, "panoptic", 133)
  with pytest.raises(ValueError, match="'coco/2017_panoptic': label name 'omnibus'"):
    pipeline.create_eval_loader(config, 2, process_index=0, process_count=1)


# ---------------------------------------------------------------------------------------------
# scene_parse150.

# TFDS split -> (official directory, file prefix, [instance scene seed or None (no instance)]).
SCENE_SPLITS = {"train": ("training", "train", [1, None]), "test": ("validation", "val", [0, 3])}


def _scene_image(split: str, k: int) -> np.ndarray:
  """A flat image whose colour (JPEG keeps it) tells which example of `split` it is."""
  return np.full((*SIZE, 3), 40 * (k + 1) + (20 if split == "test" else 0), np.uint8)


def _scene_instances(seed) -> np.ndarray:
  return np.zeros((*SIZE, 3), np.uint8) if seed is None else ade_panoptic_annotation(seed)[1]


def _scene_downloads(root) -> dict[str, str]:
  """images.tar (`images/{training,validation}/*.jpg`) and annotations_instance.tar
  (`annotations_instance/{training,validation}/*.png`, RGB: R class, G instance id)."""
  for split, (directory, prefix, seeds) in SCENE_SPLITS.items():
    for k, seed in enumerate(seeds):
      stem = f"ADE_{prefix}_{k + 1:08d}"
      image = root / "images" / directory / f"{stem}.jpg"
      instances = root / "annotations_instance" / directory / f"{stem}.png"
      image.parent.mkdir(parents=True, exist_ok=True)
      instances.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(_scene_image(split, k)).save(image, quality=95)
      Image.fromarray(_scene_instances(seed)).save(instances)
  archives = {}
  for name in ("images", "annotations_instance"):
    archives[f"{name}.tar"] = str(root / f"{name}.tar")
    with tarfile.open(archives[f"{name}.tar"], "w") as tar:
      tar.add(root / name, arcname=name)
  return archives


def _expected_instances(instances: np.ndarray):
  """`(id map, [(category, area)])`: instances by increasing G, numbered 1..n."""
  classes, ids = instances[..., 0], instances[..., 1]
  pan, segments = np.zeros(ids.shape, np.int64), []
  for k, g in enumerate(sorted(set(ids[ids > 0].tolist())), 1):
    (r,) = set(classes[ids == g].tolist())
    pan[ids == g] = k
    segments.append((r, int(np.sum(ids == g))))
  return pan, segments


def _which_scene(split: str, image: np.ndarray) -> int:
  """The written example of `split` whose flat colour `image` has."""
  colours = [_scene_image(split, k)[0, 0, 0] for k in range(len(SCENE_SPLITS[split][2]))]
  return int(np.argmin(np.abs(np.array(colours, float) - image.mean())))


@pytest.fixture(scope="module")
def scene_archives(tmp_path_factory):
  return _scene_downloads(tmp_path_factory.mktemp("scene_downloads"))


@pytest.fixture(scope="module")
def scene(tmp_path_factory, scene_archives):
  data_dir = str(tmp_path_factory.mktemp("scene_tfds"))
  _prepare_tfds(SCENE, data_dir, scene_archives, "array_record")
  return data_dir


def test_scene_parse150_labels_are_the_instance_classes():
  config = _config(SCENE, "unused", "instance", 100)
  meta = dataset_metadata(config)
  # Label k - 1 is instance class k (R): the k-th ADE20K thing class.
  for r, category in ADE_CLASS.items():
    assert meta.label_category_ids[r - 1] == category
  assert meta.num_classes == 100 and all(meta.label_isthing)


def test_scene_parse150_instances_in_our_layout(scene):
  for split, (_, _, seeds) in SCENE_SPLITS.items():
    source = sources.open_source(
      _config(SCENE, scene, "instance", 100, eval_split=split), "eval_split"
    )
    assert isinstance(source, tfds_sources.SceneParseInstanceSource) and len(source) == len(seeds)
    found = set()
    for index in range(len(source)):
      example = source[index]
      k = _which_scene(split, example["image"])
      found.add(k)
      assert example["image_id"] == index and "file_name" not in example
      pan, segments = _expected_instances(_scene_instances(seeds[k]))
      got = example["panoptic"].astype(np.int64) @ np.array([1, 256, 256**2])
      np.testing.assert_array_equal(got, pan)
      seg = example["segments"]
      assert seg["id"].tolist() == list(range(1, len(segments) + 1))
      assert seg["category_id"].tolist() == [ADE_CLASS[r] for r, _ in segments]
      assert seg["area"].tolist() == [a for _, a in segments]
      assert not seg["iscrowd"].any()
    assert found == set(range(len(seeds)))


def test_scene_parse150_eval_and_train_loaders(scene):
  _, _, seeds = SCENE_SPLITS["test"]
  config = _config(SCENE, scene, "instance", 100, eval_split="test")
  batch = _eval_batch(config, 2)
  source = sources.open_source(config, "eval_split")
  assert batch["is_real"].all() and batch["image_id"].tolist() == batch["index"].tolist()
  for b in range(2):
    k = _which_scene("test", source[int(batch["index"][b])]["image"])
    pan, segments = _expected_instances(_scene_instances(seeds[k]))
    n = len(segments)
    assert n == 5  # two persons, a chair, a bed, a flag
    np.testing.assert_array_equal(batch["panoptic"][b, :H, :W], pan)
    np.testing.assert_array_equal(batch["gt_ids"][b, :n], np.arange(1, n + 1))
    np.testing.assert_array_equal(batch["gt_labels"][b, :n], [r - 1 for r, _ in segments])
    assert batch["gt_isthing"][b, :n].all() and not batch["gt_iscrowd"][b].any()
    assert batch["gt_valid"][b].sum() == n
    np.testing.assert_array_equal(batch["ids"][b, :n], np.arange(1, n + 1))
    np.testing.assert_array_equal(batch["labels"][b, :n], [r - 1 for r, _ in segments])
    np.testing.assert_array_equal(batch["segment_ids"][b, :H, :W], pan)
  train = _train_batch(config)
  assert train["image"].shape == (2, 32, 32, 3) and train["valid"].any()
  assert set(train["labels"][train["valid"]].tolist()) <= {r - 1 for r in ADE_CLASS}


@pytest.mark.parametrize("task", ["panoptic", "semantic"])
def test_scene_parse150_serves_only_the_instance_task(tmp_path, task):
  config = _config(SCENE, str(tmp_path), task, None)
  message = f"dataset.task: 'scene_parse150' serves only the instance task, got '{task}'"
  for check in (validate_dataset_config, dataset_metadata):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
      check(config)
    assert "ade20k_panoptic" in str(error.value) and "no stuff" in str(error.value)
  # Also when the source is opened directly, before TFDS is asked for anything.
  with pytest.raises(ValueError, match=re.escape(message)):
    sources.open_source(config, "train_split")


def _encode_jpeg(image: np.ndarray, **options) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", **options)
  return buffer.getvalue()


@pytest.mark.parametrize(
  ("where", "value", "problem"),
  [
    ((14, 22, 0), ADE_CHAIR, "instance 1 has classes [4, 8] (expected one)"),  # person 1
    ((0, 0), (0, 3, 0), "instance 3 has class 0 (instance classes are 1..100)"),
    ((0, 0), (101, 3, 0), "instance 3 has class 101"),
  ],
)
def test_scene_parse150_bad_instances(where, value, problem):
  annotation = ade_panoptic_annotation(0)[1]
  annotation[where] = value
  # A stand-in for TFDS' source: the adapter reads `image` bytes and the decoded annotation.
  element = {"image": _encode_jpeg(_scene_image("train", 0)), "annotation": annotation}
  source = tfds_sources.SceneParseInstanceSource([element] * 2, "train")
  expected = f"'scene_parse150' split 'train' example 1: {problem}"
  with pytest.raises(ValueError, match=re.escape(expected)):
    source[1]


def test_images_decode_to_rgb():
  """Images are decoded to RGB as detectron2 reads them: grayscale repeated, CMYK converted."""
  rgb = _scene_image("train", 1)
  rgb[:, :10] = (200, 30, 90)
  for mode in ("RGB", "L", "CMYK"):
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, format="JPEG", quality=95)
    decoded = tfds_sources._decode_rgb(buffer.getvalue())
    assert decoded.shape == (*SIZE, 3) and decoded.dtype == np.uint8
    with Image.open(io.BytesIO(buffer.getvalue())) as expected:
      np.testing.assert_array_equal(decoded, np.asarray(expected.convert("RGB")))
      if expected.mode == "L":  # three equal channels, as TFDS' own decoding gives
        assert (decoded == decoded[..., :1]).all()


# ---------------------------------------------------------------------------------------------
# Data that cannot be read as it is.


@pytest.fixture
def tfds_command(monkeypatch):
  """`parse(line)`: a `tfds SUBCOMMAND --flags` line parsed by TFDS' own parser of that
  subcommand; `parse(line).execute()` runs it.

  TFDS 4.9's `tfds` program imports apache_beam and mlcroissant when it starts. The parsers of
  `build` and `convert_format` need neither, but `convert_format`'s module names a base class
  from apache_beam: where it is not installed, an empty module stands in (converting without
  `--use_beam` never calls it).
  """
  try:
    import apache_beam  # noqa: F401
  except ImportError:
    stub = types.ModuleType("apache_beam")
    stub.DoFn = object
    monkeypatch.setitem(sys.modules, "apache_beam", stub)
  from tensorflow_datasets.scripts.cli import build, cli_utils, convert_format

  commands = {"build": build.Args, "convert_format": convert_format.Args}

  def parse(line: str):
    program, command, *flags = shlex.split(line)
    assert program == "tfds"
    return cli_utils.make_flags_parser(commands[command], command)([command, *flags])

  return parse


def test_not_prepared_says_how_to_prepare(tmp_path, tfds_command):
  config = _config(COCO, str(tmp_path), "panoptic", 133)
  with pytest.raises(ValueError, match="'coco/2017_panoptic' is not prepared") as error:
    pipeline.create_eval_loader(config, 2, process_index=0, process_count=1)
  message = str(error.value)
  assert "python -m mpformer_jax.data.prepare --dataset coco_panoptic" in message
  # TFDS' own parser of `tfds build` takes the suggested command as meant.
  (command,) = re.findall(r"`(tfds build [^`]*)`", message)
  args = tfds_command(command)
  assert args.positional_datasets == [COCO] and str(args.paths.data_dir) == str(tmp_path)
  assert args.generation.file_format == "array_record"


def test_tfrecord_data_gives_the_conversion_command(tmp_path, scene_archives, tfds_command):
  data_dir = str(tmp_path / "tfds")
  builder = _prepare_tfds(SCENE, data_dir, scene_archives, "tfrecord")
  config = _config(SCENE, data_dir, "instance", 100, eval_split="test")
  with pytest.raises(
    ValueError, match="is stored as tfrecord .*, which has no random acc"
  ) as error:
    pipeline.create_eval_loader(config, 2, process_index=0, process_count=1)
  (command,) = re.findall(r"`(tfds convert_format [^`]*)`", str(error.value))
  assert command == (
    f"tfds convert_format --dataset_version_dir={builder.data_dir} --out_file_format=array_record"
  )
  # Running that command (TFDS' own, in this process) makes the data readable.
  tfds_command(command).execute()
  batch = _eval_batch(config, 2)
  assert batch["is_real"].all() and batch["gt_valid"].sum() == 10
