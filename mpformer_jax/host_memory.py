"""Keeps freed host memory in the process, so that big per-step buffers are not faulted in anew.

Why: on the CPU, XLA allocates an executable's temporary buffer when a call starts and frees it
when the call ends; for R50 Mask2Former's forward+backward (batch 2) it is 1.2 GB at 256 x 256.
glibc serves requests that large with `mmap` and returns them with `munmap`, so every training
step page-faults the whole buffer in again, and the kernel zeroes every page first. Measured on
a 2-core machine: 350 thousand minor faults and 1.0-1.8 s of kernel time per 3.5 s step at 256,
1.5 million faults per step at 512. PyTorch's CPU allocator goes through the same `malloc`.

glibc gives threads other than the main one arenas of at most 64 MB, and serves larger requests
from them with `mmap` whatever `M_MMAP_THRESHOLD` says; XLA's worker threads make exactly those
requests. So three `mallopt` settings are needed: one arena for all threads (`M_ARENA_MAX`),
no `mmap` (`M_MMAP_MAX = 0`: the heap grows with `brk`), and no trimming (`M_TRIM_THRESHOLD`:
freed memory stays in the heap). The heap then grows to the peak once and is reused; a step
after the first faults no pages in.

Costs: the process keeps its peak heap until it exits (the peak itself does not change), and all
threads share one malloc lock. This matters little for XLA:CPU, which allocates few, large
buffers; on GPU and TPU hosts the device memory has its own allocator, and a busy input
pipeline may prefer glibc's defaults, so `auto` turns this on only when JAX runs on the CPU.

Threads pick their arena at their first allocation, so this must run before JAX starts its CPU
client (before the first `jax.devices()`, `jax.jit` call or `jax.distributed.initialize`);
`main.py` calls `configure` first thing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import re

SETTINGS = ("auto", "on", "off")

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Distributions that give JAX a GPU or TPU backend.
_ACCELERATOR_PLUGIN = re.compile(r"^(jax[-_](cuda|rocm)\d*[-_](plugin|pjrt)|libtpu([-_]nightly)?)$")


def _glibc():
  """glibc as a `ctypes.CDLL`, or None on other C libraries (musl, macOS)."""
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
  except (OSError, AttributeError, TypeError):
    return None
  return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
  """Sets glibc malloc to one arena, no `mmap` and no trimming (see the module docstring).

  Returns:
    True if all three settings took; False where the C library is not glibc (nothing changes).
  """
  libc = _glibc()
  if libc is None:
    return False
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # mallopt takes an int; glibc stores the trim threshold as a size_t, so -1 means "never".
  results = [
    libc.mallopt(_M_ARENA_MAX, 1),
    libc.mallopt(_M_MMAP_MAX, 0),
    libc.mallopt(_M_TRIM_THRESHOLD, -1),
  ]
  return all(r == 1 for r in results)


def accelerator_plugin_installed() -> bool:
  """Whether a JAX GPU or TPU plugin is installed (read from package metadata, not imported)."""
  for dist in importlib.metadata.distributions():
    name = dist.metadata["Name"] or ""
    if _ACCELERATOR_PLUGIN.match(name.lower()):
      return True
  return False


def resolve(setting: str, jax_platforms: str | None, accelerator_plugin: bool) -> bool:
  """Whether to keep freed memory, for a setting of `host.keep_freed_memory`.

  Args:
    setting: `"on"`, `"off"` or `"auto"` (on when JAX will run on the CPU).
    jax_platforms: JAX's `jax_platforms` setting (`JAX_PLATFORMS`), e.g. `"cpu"` or
      `"cuda,cpu"`; None or empty when JAX picks the best backend itself.
    accelerator_plugin: whether a GPU/TPU plugin is installed (what JAX would pick then).

  Raises:
    ValueError: naming the field, for a setting outside `SETTINGS`.
  """
  if setting not in SETTINGS:
    raise ValueError(f"host.keep_freed_memory must be one of {SETTINGS}, got {setting!r}")
  if setting != "auto":
    return setting == "on"
  if jax_platforms:
    return jax_platforms.split(",")[0].strip() == "cpu"
  return not accelerator_plugin


def configure(setting: str) -> bool:
  """Applies `host.keep_freed_memory`; call it before JAX starts a backend.

  Returns:
    True if freed memory is now kept in the process.
  """
  import jax

  platforms = jax.config.jax_platforms
  plugin = setting == "auto" and not platforms and accelerator_plugin_installed()
  if not resolve(setting, platforms, plugin):
    return False
  return keep_freed_memory()
