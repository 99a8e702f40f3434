"""Metric writers and progress reports: CLU's when TensorFlow is installed, a plain fallback if not.

`clu.metric_writers` and `clu.periodic_actions` import TensorFlow (for TensorBoard summaries).
On machines without it (the GPU benchmark machines) the trainer writes the same scalars to the
log and to `WORKDIR/metrics.jsonl` and reports steps/s itself.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging


def tensorflow_available() -> bool:
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    return False
  return True


class JsonLogWriter:
  """Writes scalars to the log and as one JSON line per call to `WORKDIR/metrics.jsonl`.

  Same `write_scalars` / `flush` / `close` methods as a CLU `MetricWriter`.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._enabled = enabled

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))
    if self._enabled:
      with open(self._path, "a") as f:
        f.write(json.dumps({"step": int(step), **values}) + "\n")

  def write_hparams(self, hparams: dict[str, Any]) -> None:
    del hparams

  def write_images(self, step: int, images: dict[str, Any]) -> None:
    del step, images  # pictures go to TensorBoard (and WORKDIR/overlays) only

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class _MultiWriter:
  def __init__(self, writers):
    self._writers = writers

  def write_scalars(self, step, scalars):
    for w in self._writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, hparams):
    for w in self._writers:
      w.write_hparams(hparams)

  def write_images(self, step, images):
    for w in self._writers:
      w.write_images(step, images)

  def flush(self):
    for w in self._writers:
      w.flush()

  def close(self):
    for w in self._writers:
      w.close()


def create_writer(workdir: str):
  """TensorBoard summaries + log (CLU) and `metrics.jsonl`; only process 0 writes files."""
  primary = jax.process_index() == 0
  json_writer = JsonLogWriter(workdir, enabled=primary)
  if not tensorflow_available():
    logging.warning("TensorFlow is not installed: no TensorBoard summaries, see metrics.jsonl.")
    return _MultiWriter([json_writer])
  from clu import metric_writers

  if not primary:
    return _MultiWriter([json_writer])
  summary = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))
  return _MultiWriter([metric_writers.AsyncWriter(summary), json_writer])


class ProgressReporter:
  """Steps/s and ETA every `every_steps` (CLU's `ReportProgress` when available)."""

  def __init__(self, total_steps: int, writer, every_steps: int):
    self._writer = writer
    self._every = every_steps
    self._total = total_steps
    self._clu = None
    if tensorflow_available():
      from clu import periodic_actions

      self._clu = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=every_steps
      )
    self._last = None

  def __call__(self, step: int) -> None:
    if self._clu is not None:
      self._clu(step)
      return
    now = time.monotonic()
    if self._last is None:
      self._last = (step, now)
      return
    if step % self._every:
      return
    last_step, last_time = self._last
    rate = (step - last_step) / max(now - last_time, 1e-9)
    eta_min = (self._total - step) / max(rate, 1e-9) / 60
    self._writer.write_scalars(step, {"steps_per_sec": rate})
    logging.info("Step %d/%d: %.3g steps/s, ETA %.1f min", step, self._total, rate, eta_min)
    self._last = (step, now)


class Profiler:
  """Traces steps `[first_step, first_step + num_steps)` for TensorBoard's profile plugin.

  CLU's `periodic_actions.Profile` when TensorFlow is installed, `jax.profiler` directly if
  not; the trace goes to `logdir` (`WORKDIR/tensorboard`) either way. Only process 0 traces.
  """

  def __init__(self, logdir: str, first_step: int, num_steps: int):
    self._logdir = logdir
    self._first, self._num = first_step, num_steps
    self._enabled = num_steps > 0 and jax.process_index() == 0
    self._clu = None
    self._running = False
    if self._enabled and tensorflow_available():
      from clu import periodic_actions

      self._clu = periodic_actions.Profile(
        logdir=logdir,
        num_profile_steps=num_steps,
        profile_duration_ms=None,
        first_profile=first_step,
        every_secs=None,
      )

  def __call__(self, step: int) -> None:
    """Call after each step `step` (1-based) has been dispatched."""
    if not self._enabled:
      return
    if self._clu is not None:
      self._clu(step)
      return
    if step == self._first and not self._running:
      jax.profiler.start_trace(self._logdir)
      self._running = True
    elif self._running and step >= self._first + self._num:
      self.close()

  def close(self) -> None:
    """Ends a trace still running (training ended inside the traced window)."""
    if self._clu is not None and getattr(self._clu, "_session_running", False):
      from clu import profiler

      self._clu._end_session(profiler.stop())  # noqa: SLF001 (CLU has no public stop)
    elif self._running:
      jax.profiler.stop_trace()
      self._running = False
