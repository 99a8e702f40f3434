"""host.keep_freed_memory: glibc keeps freed memory, so a big buffer is not faulted in twice."""

import json
import subprocess
import sys
import textwrap

import pytest

from mpformer_jax import host_memory

# A worker thread (like XLA's) allocates, touches and frees 256 MB twice; the second round's
# minor page faults are counted. malloc/memset through ctypes, so no library's own allocator or
# madvise gets in between.
_PROBE = textwrap.dedent(
  """
  import ctypes, json, resource, sys, threading
  from mpformer_jax import host_memory

  kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  libc.malloc.argtypes = (ctypes.c_size_t,)
  libc.free.argtypes = (ctypes.c_void_p,)
  size = 256 << 20
  faults = []

  def work():
    for _ in range(2):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      ptr = libc.malloc(size)
      ctypes.memset(ptr, 1, size)
      libc.free(ptr)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

  thread = threading.Thread(target=work)
  thread.start()
  thread.join()
  print(json.dumps({"kept": kept, "faults": faults, "pages": size // 4096}))
  """
)


def _probe(mode: str) -> dict:
  out = subprocess.run(
    [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
  kept, system = _probe("keep"), _probe("system")
  assert kept["kept"] is True
  pages = kept["pages"]
  # glibc's defaults: the worker thread's 256 MB goes to mmap and munmap, and the second
  # round faults every page in again (the control shows this test can fail).
  assert system["faults"][1] > pages // 2, system
  # Kept: the first round grows the heap, the second reuses it.
  assert kept["faults"][0] > pages // 2, kept
  assert kept["faults"][1] < pages // 100, kept


@pytest.mark.parametrize(
  "setting, platforms, plugin, expected",
  [
    ("on", "cuda", True, True),
    ("off", "cpu", False, False),
    ("auto", "cpu", True, True),
    ("auto", "cpu,cuda", True, True),
    ("auto", "cuda,cpu", False, False),
    ("auto", "tpu", False, False),
    ("auto", None, False, True),
    ("auto", "", True, False),
  ],
)
def test_auto_keeps_freed_memory_only_where_jax_runs_on_the_cpu(
  setting, platforms, plugin, expected
):
  assert host_memory.resolve(setting, platforms, plugin) is expected


def test_an_unknown_setting_names_the_field():
  with pytest.raises(ValueError, match="host.keep_freed_memory"):
    host_memory.resolve("yes", "cpu", False)
