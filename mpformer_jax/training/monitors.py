"""Watchdogs of the training loop: non-finite steps, recompilations, preemption.

Both are plain Python (no TensorFlow or CLU), so they run on every machine.
"""

from __future__ import annotations

import collections
import signal
import threading

import jax
from absl import logging

# Recorded by jax (with the jitted function's name) each time XLA compiles a program.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class NonFiniteLossError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class NonFiniteGuard:
  """Counts consecutive skipped (non-finite) steps and stops training after `max_in_a_row`.

  The train step itself leaves the state untouched on a non-finite loss or gradient; this
  guard turns a run that keeps producing them into a clear error instead of silent idling.
  """

  def __init__(self, max_in_a_row: int):
    if max_in_a_row < 1:
      raise ValueError(f"training.max_nonfinite_steps must be >= 1, got {max_in_a_row}")
    self.max_in_a_row = max_in_a_row
    self.in_a_row = 0
    self.total = 0

  def update(self, step: int, finite: bool, last_checkpoint: str = "") -> None:
    """Records step `step`.

    Raises:
      NonFiniteLossError: on the `max_in_a_row`-th consecutive non-finite step; the message
        names `last_checkpoint` (the newest checkpoint, which holds finite parameters).
    """
    if finite:
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.total += 1
    logging.warning("Step %d: non-finite loss or gradient, update skipped", step)
    if self.in_a_row >= self.max_in_a_row:
      raise NonFiniteLossError(
        f"{self.in_a_row} consecutive steps with a non-finite loss or gradient (last at step "
        f"{step}); training stopped. Newest checkpoint: {last_checkpoint or 'none'}"
      )


class CompileCounter:
  """Counts XLA compilations (and their seconds) per function name while active.

  A context manager.

  The train step must compile once: a recompilation (a shape or dtype that changed, a Python
  value baked into the trace) costs minutes on large models, so the trainer reports any.
  """

  def __init__(self):
    self.counts: collections.Counter[str] = collections.Counter()
    self.seconds: collections.Counter[str] = collections.Counter()

  def _listener(self, event: str, duration: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE_EVENT:
      name = str(kwargs.get("fun_name", "?"))
      # jax reports `jit(<function name>)`; count under the plain function name.
      if name.startswith("jit(") and name.endswith(")"):
        name = name[len("jit(") : -1]
      self.counts[name] += 1
      self.seconds[name] += duration

  def __enter__(self) -> CompileCounter:
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listener)


class PreemptionWatch:
  """Tells the loop to save and stop when the job is asked to end (SIGTERM).

  With several processes, jax's preemption sync point (through the Orbax manager) makes every
  process stop after the same step. A single process has no such service, so a SIGTERM handler
  sets a flag that the loop reads after each step. Use as a context manager (restores the
  previous handler on exit).
  """

  def __init__(self, manager):
    self._manager = manager
    self._signalled = False
    self._previous = None

  def _handler(self, signum, frame) -> None:
    del signum, frame
    self._signalled = True

  def __enter__(self) -> PreemptionWatch:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._manager.reached_preemption(step)
    return self._signalled
