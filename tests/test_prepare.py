"""`prepare`: one contract and report for every raw dataset, its command line, TFDS names."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

from mpformer_jax.data import default_dataset_config, raw_io, sources
from mpformer_jax.data.prepare import BUILDERS, Progress, prepare
from tests import raw_datasets as raw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
  """`python -m mpformer_jax.data.prepare ARGS` (or `python -c CODE`) in a fresh process."""
  command = [sys.executable, "-c", code] if code else [sys.executable, "-m", *args]
  env = {**os.environ, "PYTHONPATH": REPO}
  return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def _write_ade20k(root, bad: bool = False):
  """Two train and one validation example; `bad` adds a truncated train JPEG (returned)."""
  for index in (1, 2):
    raw.write_ade20k(root, "train", index, raw.ade_image(index), raw.ade_label_map(0))
  raw.write_ade20k(root, "validation", 1, raw.ade_image(5), raw.ade_label_map(1))
  if not bad:
    return None
  image, _ = raw.write_ade20k(root, "train", 3, raw.ade_image(3), raw.ade_label_map(0))
  image.write_bytes(image.read_bytes()[:200])
  return image


def _prepare_args(name, manual_dir, data_dir, *extra):
  return (
    "mpformer_jax.data.prepare",
    f"--dataset={name}",
    f"--manual_dir={manual_dir}",
    f"--data_dir={data_dir}",
    *extra,
  )


# ---------------------------------------------------------------------------------------------
# The command line.


def test_cli_prepares_shows_progress_and_prints_the_report(tmp_path):
  _write_ade20k(tmp_path / "raw")
  args = _prepare_args("ade20k_semantic", tmp_path / "raw", tmp_path / "out", "--progress=log")
  result = _run(*args)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)  # stdout holds the report only
  assert report == {
    "dataset": "ade20k_semantic",
    "skip_bad": False,
    "examples": {"train": 2, "validation": 1},
    "skipped": [],
    "skipped_per_split": {"train": 0, "validation": 0},
    "reencoded_images": [],
    "counts": {},
  }
  for line in ("ade20k_semantic train: 1/2 (50%)", "ade20k_semantic train: 2/2 (100%)"):
    assert line in result.stderr.splitlines()
  assert "ade20k_semantic validation: 1/1 (100%)" in result.stderr
  # The prepared data is what the API reads, and a second run reuses it and its report.
  builder, stored = prepare("ade20k_semantic", str(tmp_path / "raw"), str(tmp_path / "out"))
  assert json.loads(stored.to_json()) == report
  assert len(builder.as_data_source("train")) == 2
  again = _run(*_prepare_args("ade20k_semantic", tmp_path / "missing", tmp_path / "out"))
  assert again.returncode == 0 and json.loads(again.stdout) == report


def test_cli_bad_example_is_one_line_naming_the_file_or_skipped(tmp_path):
  bad = _write_ade20k(tmp_path / "raw", bad=True)
  result = _run(*_prepare_args("ade20k_semantic", tmp_path / "raw", tmp_path / "strict"))
  assert result.returncode == 1 and result.stdout == ""
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors == [result.stderr.splitlines()[-1]]
  assert errors[0].startswith(f"error: {bad}: corrupt or unreadable image")
  assert errors[0].endswith("(--skip_bad leaves such examples out)")

  lenient = _prepare_args("ade20k_semantic", tmp_path / "raw", tmp_path / "lenient", "--skip_bad")
  result = _run(*lenient)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  assert report["skip_bad"] and report["examples"] == {"train": 2, "validation": 1}
  assert report["skipped_per_split"] == {"train": 1, "validation": 0}
  assert [file for file, _ in report["skipped"]] == [str(bad)]
  assert report["skipped"][0][1].startswith("corrupt or unreadable image")


def test_cli_missing_manual_dir_is_one_line(tmp_path):
  missing = tmp_path / "no_such_dir"
  result = _run(*_prepare_args("cityscapes", missing, tmp_path / "out"))
  assert result.returncode == 1 and "Traceback" not in result.stderr
  last = result.stderr.splitlines()[-1]
  assert last.startswith(f"error: {missing}: manual directory does not exist")
  assert "cityscapes_builder.MANUAL_DOWNLOAD_INSTRUCTIONS" in last
  # A wrong dataset name is argparse's usage error.
  result = _run(*_prepare_args("coco", missing, tmp_path / "out"))
  assert result.returncode == 2 and "invalid choice: 'coco'" in result.stderr


# ---------------------------------------------------------------------------------------------
# One contract for every dataset.


def _write_all(root) -> dict:
  """A tiny raw copy of each dataset under `root/<name>`."""
  coco = str(root / "coco")
  raw.write_coco_panoptic(coco)
  raw.write_coco_instances(coco)
  _write_ade20k(root / "ade20k_semantic")
  label, instances = raw.ade_panoptic_annotation(0)
  for split in ("train", "validation"):
    raw.write_ade20k_panoptic(
      root / "ade20k_panoptic", split, 1, raw.ade_image(1), label, instances
    )
  for split, city in (("train", "aachen"), ("validation", "lindau")):
    raw.write_cityscapes(root / "cityscapes", split, city, 1)
  return {
    "coco_panoptic": coco,
    "coco_instance": coco,
    "ade20k_semantic": str(root / "ade20k_semantic"),
    "ade20k_panoptic": str(root / "ade20k_panoptic"),
    "cityscapes": str(root / "cityscapes"),
  }


def test_every_dataset_has_the_same_contract_and_report(tmp_path):
  manual_dirs = _write_all(tmp_path)
  assert sorted(BUILDERS) == sorted(manual_dirs)
  data_dir = str(tmp_path / "tfds")
  keys = None
  for name, manual_dir in manual_dirs.items():
    calls = []
    progress = lambda split, done, total, calls=calls: calls.append((split, done, total))
    builder, report = prepare(name, manual_dir, data_dir, progress=progress)
    assert isinstance(builder, BUILDERS[name]) and isinstance(report, raw_io.BuildReport)
    assert report.dataset == builder.name == name
    assert set(report.examples) == set(report.skipped_per_split) == {"train", "validation"}
    assert report.skipped == [] and sum(report.examples.values()) >= 2
    # Progress counts every record of each split up to its total, train first.
    totals = {split: total for split, _, total in calls}
    assert totals == report.examples and calls[0][:2] == ("train", 1)
    assert calls[-1] == ("validation", totals["validation"], totals["validation"])
    fields = set(json.loads(report.to_json()))
    keys = keys or fields
    assert fields == keys == {f.name for f in dataclasses.fields(raw_io.BuildReport)}
    # Only COCO instances and ADE20K panoptic have dataset-specific counts.
    assert bool(report.counts) == (name in ("coco_instance", "ade20k_panoptic"))
    assert os.path.exists(os.path.join(builder.data_dir, raw_io.REPORT_FILE))
    # Reuse: the stored report, without reading the raw files again.
    again, stored = prepare(name, str(tmp_path / "gone"), data_dir, skip_bad=True)
    assert again.data_dir == builder.data_dir and stored == report


def test_prepare_rejects_unknown_names_and_empty_manual_dirs(tmp_path):
  with pytest.raises(ValueError, match="dataset must be one of"):
    prepare("coco/2017_panoptic", str(tmp_path), str(tmp_path / "out"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(raw_io.RawDataError, match="manual directory is empty") as error:
    prepare("ade20k_semantic", str(tmp_path / "empty"), str(tmp_path / "out"))
  assert error.value.file == str(tmp_path / "empty")
  # A missing split directory is a problem of the whole dataset, not one example.
  (tmp_path / "raw" / "leftImg8bit").mkdir(parents=True)
  with pytest.raises(raw_io.RawDataError, match="directory missing") as error:
    prepare("cityscapes", str(tmp_path / "raw"), str(tmp_path / "out"), skip_bad=True)
  assert not isinstance(error.value, raw_io.BadExampleError)


def test_open_source_names_the_prepare_command_for_unprepared_data(tmp_path):
  config = default_dataset_config()
  config.name, config.task, config.num_classes = "ade20k_semantic", "semantic", 150
  config.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match="python -m mpformer_jax.data.prepare --dataset ade20k"):
    sources.open_source(config, "eval_split")


def test_progress_logs_every_five_percent_or_draws_a_bar():
  stream = io.StringIO()
  progress = Progress("demo", use_tqdm=False, stream=stream)
  for done in range(1, 41):
    progress("train", done, 40)
  progress("validation", 1, 1)
  lines = stream.getvalue().splitlines()
  assert lines[0] == "demo train: 1/40 (2%)" and lines[-2] == "demo train: 40/40 (100%)"
  assert len(lines) == 1 + 20 + 1  # the first record, each 5% step, the other split
  assert lines[-1] == "demo validation: 1/1 (100%)"
  pytest.importorskip("tqdm")
  stream = io.StringIO()
  progress = Progress("demo", use_tqdm=True, stream=stream)
  for done in range(1, 5):
    progress("train", done, 4)
  progress.close()
  assert "demo train: 100%" in stream.getvalue() and "4/4" in stream.getvalue()


# ---------------------------------------------------------------------------------------------
# The name "cityscapes" is ours, whatever ran first.

_RESOLVE = """
import tensorflow_datasets as tfds
{before}
import mpformer_jax.data.sources
builder = tfds.builder("cityscapes", data_dir={data_dir!r})
print(type(builder).__module__, type(builder).__name__)
"""


@pytest.mark.parametrize(
  "before",
  [
    "",
    # TFDS registers its own (TF-based) cityscapes builder during this lookup.
    'tfds.builder("cityscapes", data_dir={data_dir!r})',
  ],
)
def test_tfds_builder_cityscapes_is_ours_in_a_fresh_process(tmp_path, before):
  data_dir = str(tmp_path)
  code = _RESOLVE.format(before=before.format(data_dir=data_dir), data_dir=data_dir)
  result = _run(code=textwrap.dedent(code))
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["mpformer_jax.data.cityscapes_builder", "Cityscapes"]


# ---------------------------------------------------------------------------------------------
# The shared image reader.


def _write_png16(path, rgb16: np.ndarray) -> None:
  """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  h, w, _ = rgb16.shape
  rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)
  header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
  png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
  path.write_bytes(png + chunk(b"IEND", b""))


def test_read_image_keeps_8_bit_rgb_and_gray_files_and_converts_the_rest(tmp_path):
  from PIL import Image

  rgb = raw.ade_image(1)
  paths = {
    "rgb.jpg": lambda p: Image.fromarray(rgb).save(p, format="JPEG"),
    "gray.jpg": lambda p: Image.fromarray(rgb).convert("L").save(p, format="JPEG"),
    "rgb.png": lambda p: Image.fromarray(rgb).save(p),
    "gray.png": lambda p: Image.fromarray(rgb[..., 0]).save(p),
    "cmyk.jpg": lambda p: Image.fromarray(rgb).convert("CMYK").save(p, format="JPEG"),
    "palette.png": lambda p: Image.fromarray(rgb).convert("P").save(p),
    "alpha.png": lambda p: Image.fromarray(rgb).convert("RGBA").save(p),
    # 16 bits per channel: PIL reads 8-bit RGB, OpenCV (TFDS' decoder if installed) uint16.
    "deep.png": lambda p: _write_png16(p, rgb.astype(np.uint16) * 257 + 3),
  }
  decoder = raw_io.features(None)["image"]
  for name, write in paths.items():
    path = tmp_path / name
    write(path)
    stored = raw_io.read_image(path)
    assert stored.size == raw.SIZE
    assert stored.reencoded == (name in ("cmyk.jpg", "palette.png", "alpha.png", "deep.png"))
    assert (stored.data == path.read_bytes()) == (not stored.reencoded)
    # What the loaders decode is what detectron2's reader gives: PIL's RGB conversion.
    with Image.open(path) as image:
      expected = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(decoder.decode_example_np(stored.data), expected, err_msg=name)
