"""Prepares a real dataset from its raw files: `prepare(name, ...)` and a command line.

    python -m mpformer_jax.data.prepare --dataset coco_panoptic --manual_dir RAW \
      --data_dir ~/tensorflow_datasets [--skip_bad]

builds the dataset (ArrayRecord, no TensorFlow) into `data_dir/<name>/<version>`, which
`dataset.data_dir` then points the loaders at, showing its progress per split on stderr. It prints
the build report (`raw_io.BuildReport`) as JSON on stdout and exits with 0. Bad raw data fails
with a one-line error naming the file (exit code 1): use `--skip_bad` to leave such examples out
(they are listed in the report). Data already prepared in `data_dir` is reused, and the report is
the one stored by the build that made it.

Datasets (`BUILDERS`): coco_panoptic, coco_instance, ade20k_semantic, ade20k_panoptic,
cityscapes; the expected raw layout of each is its builder's `MANUAL_DOWNLOAD_INSTRUCTIONS`.
Importing this module registers them all with TFDS.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import tensorflow_datasets as tfds
from absl import logging

from mpformer_jax.data import ade20k_builder, cityscapes_builder, coco_builder, raw_io

BUILDERS: dict[str, type[raw_io.RawBuilder]] = {
  **coco_builder.BUILDERS,
  ade20k_builder.NAME: ade20k_builder.Ade20kSemantic,
  ade20k_builder.PANOPTIC_NAME: ade20k_builder.Ade20kPanoptic,
  cityscapes_builder.NAME: cityscapes_builder.Cityscapes,
}


def prepare(
  name: str,
  manual_dir: str,
  data_dir: str,
  skip_bad: bool = False,
  progress: raw_io.ProgressFn | None = None,
) -> tuple[raw_io.RawBuilder, raw_io.BuildReport | None]:
  """Builds dataset `name` from the raw files in `manual_dir` into `data_dir`, unless it is there.

  Args:
    name: a key of `BUILDERS`.
    manual_dir: the raw files (layout in the builder's `MANUAL_DOWNLOAD_INSTRUCTIONS`); unused
      when the data is already prepared.
    data_dir: TFDS data directory; the data goes to `data_dir/<name>/<version>`.
    skip_bad: skip bad examples (listed in the report) instead of raising on the first.
    progress: called as `progress(split, done, total)` while building.

  Returns:
    `(builder, report)`: read the data with `builder.as_data_source(split)`. The report is the
    one stored with the data (for a reused build, that build's, whatever `skip_bad` is now);
    None only for data prepared by other means, without a report.

  Raises:
    BadExampleError: (a `RawDataError`) for a bad example when `skip_bad` is False.
    RawDataError: (a `ValueError`) for a missing or empty `manual_dir` or a problem with a
      whole annotation file or split directory.
    ValueError: for an unknown `name`.
  """
  if name not in BUILDERS:
    raise ValueError(f"dataset must be one of {sorted(BUILDERS)}, got {name!r}")

  def make():
    return BUILDERS[name](
      data_dir=data_dir, skip_bad=skip_bad, progress=progress, file_format="array_record"
    )

  builder = make()
  if not builder.is_prepared():
    _check_manual_dir(manual_dir, name)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
      builder.download_and_prepare(download_config=config)
    except OSError:
      # Another process sharing the disk may have finished the same build first.
      builder = make()
      if not builder.is_prepared():
        raise
  report = builder.report
  if report is None:
    logging.warning("%s: no build report in %s; skipped examples unknown", name, builder.data_dir)
  elif report.skipped:
    logging.warning("%s: %d bad example(s) left out: %s", name, len(report.skipped), report.skipped)
  return builder, report


def _check_manual_dir(manual_dir: str, name: str) -> None:
  """TFDS' own check fails with a multi-line AssertionError; this names the directory."""
  where = f"the raw files of {name} (see {BUILDERS[name].__module__}.MANUAL_DOWNLOAD_INSTRUCTIONS)"
  if not manual_dir or not os.path.isdir(manual_dir):
    raise raw_io.RawDataError(manual_dir, f"manual directory does not exist; it must hold {where}")
  if not os.listdir(manual_dir):
    raise raw_io.RawDataError(manual_dir, f"manual directory is empty; it must hold {where}")


class Progress:
  """A `progress(split, done, total)` callback: a tqdm bar per split, or log lines.

  Args:
    name: the dataset, shown with each split.
    use_tqdm: None to use tqdm when it is installed.
    every_percent: without tqdm, a line is written each time this much of a split is done.
    stream: where bars and lines go.
  """

  def __init__(self, name: str, use_tqdm: bool | None = None, every_percent: int = 5, stream=None):
    self._name, self._every, self._stream = name, every_percent, stream or sys.stderr
    self._tqdm = None
    if use_tqdm is not False:
      try:
        import tqdm  # optional: TFDS installs it, this project does not require it
      except ImportError:
        if use_tqdm:
          raise
      else:
        self._tqdm = tqdm.tqdm
    self._split, self._bar, self._next = None, None, 0

  def __call__(self, split: str, done: int, total: int) -> None:
    if split != self._split:
      self.close()
      self._split, self._next = split, 0
      if self._tqdm is not None:
        desc = f"{self._name} {split}"
        self._bar = self._tqdm(total=total, desc=desc, unit="ex", file=self._stream)
    if self._bar is not None:
      self._bar.update(done - self._bar.n)
    elif done * 100 >= self._next * total or done == total:
      percent = 100 * done // max(total, 1)
      print(f"{self._name} {split}: {done}/{total} ({percent}%)", file=self._stream, flush=True)
      self._next = (percent // self._every + 1) * self._every

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def main(argv: list[str] | None = None) -> int:
  """The command line (module docstring); returns the exit code."""
  parser = argparse.ArgumentParser(
    prog="python -m mpformer_jax.data.prepare", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--dataset", required=True, choices=sorted(BUILDERS))
  parser.add_argument("--manual_dir", required=True, help="directory of the raw files")
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to write")
  parser.add_argument(
    "--skip_bad", action="store_true", help="leave bad examples out (reported) instead of failing"
  )
  parser.add_argument(
    "--progress", choices=("auto", "bar", "log"), default="auto", help="bar needs tqdm"
  )
  args = parser.parse_args(argv)
  # Ours replaces TFDS' bars, which know no split totals.
  tfds.disable_progress_bar()
  use_tqdm = {"auto": None, "bar": True, "log": False}[args.progress]
  progress = Progress(args.dataset, use_tqdm=use_tqdm)
  manual_dir, data_dir = (os.path.expanduser(d) for d in (args.manual_dir, args.data_dir))
  try:
    # TFDS prints its own messages to stdout, which carries only the report.
    with contextlib.redirect_stdout(sys.stderr):
      _, report = prepare(args.dataset, manual_dir, data_dir, args.skip_bad, progress)
  except raw_io.RawDataError as error:
    progress.close()
    # One line, however the underlying library worded its error.
    message = " ".join(f"{error.file}: {error.problem}".split())
    bad_example = isinstance(error, raw_io.BadExampleError)
    hint = " (--skip_bad leaves such examples out)" if bad_example else ""
    print(f"error: {message}{hint}", file=sys.stderr)
    return 1
  progress.close()
  print("null" if report is None else report.to_json())
  return 0


if __name__ == "__main__":
  sys.exit(main())
