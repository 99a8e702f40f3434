"""Ground-truth slots cut per batch to the smallest of a few sizes that holds every segment.

The pipeline pads every image's ground truth to `dataset.max_gt` slots (128 for COCO), but a
batch of COCO images rarely has more than 30 segments in one image. Matching costs, mask losses
and, above all, the mask pilot's block of `groups * slots` extra decoder queries all grow with
the slot count, while the reference sizes its MP block by the batch's largest count.

With `training.gt_slot_buckets` set, each batch's targets are cut, on the host before they
reach the devices, to the smallest bucket that holds the batch's largest segment count. The
valid slots of an image are a prefix (`data.targets.panoptic_to_targets`), so cutting only
removes empty padding, and empty slots change neither the loss nor the gradients (the mask
pilot hides slots beyond the reference's block; `tests/test_mask_pilot.py` checks the padding
invariance). The train step then compiles once per bucket it meets, and never again.

With several processes, every process must cut to the same size (the global batch is one array):
the largest count is agreed on with one tiny all-gather per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

SLOT_KEYS = ("ids", "labels", "valid")


def bucket_sizes(buckets: Sequence[int], max_gt: int) -> tuple[int, ...]:
  """The sorted slot sizes in use: the configured buckets below `max_gt`, and `max_gt`.

  Raises:
    ValueError: for a bucket that is not a positive int, naming `training.gt_slot_buckets`.
  """
  for b in buckets:
    if not isinstance(b, int) or isinstance(b, bool) or b < 1:
      raise ValueError(f"training.gt_slot_buckets must hold positive ints, got {tuple(buckets)!r}")
  return tuple(sorted({b for b in buckets if b < max_gt} | {int(max_gt)}))


def choose_bucket(largest_count: int, sizes: Sequence[int]) -> int:
  """The smallest of `sizes` (sorted) that holds `largest_count` segments."""
  for size in sizes:
    if largest_count <= size:
      return size
  raise ValueError(f"{largest_count} segments in one image exceed every slot size {sizes}")


def largest_count(valid: np.ndarray) -> int:
  """Most valid slots of one image, over this process's batch and (agreed) every process's."""
  local = int(np.asarray(valid).sum(axis=1).max(initial=0))
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.int32(local))))


def cut_slots(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """The batch with its per-slot arrays (`SLOT_KEYS`, `[B, M]`) cut to the first `size` slots.

  Raises:
    ValueError: if a valid slot lies at or beyond `size`, or valid slots are not a prefix
      (cutting would lose ground truth).
  """
  valid = np.asarray(batch["valid"])
  counts = valid.sum(axis=1)
  prefix = np.arange(valid.shape[1])[None, :] < counts[:, None]
  if not np.array_equal(valid, prefix):
    raise ValueError("gt_slot_buckets: the valid slots of an image must come first")
  if counts.max(initial=0) > size:
    raise ValueError(f"gt_slot_buckets: {counts.max()} segments do not fit in {size} slots")
  return {k: (v[:, :size] if k in SLOT_KEYS else v) for k, v in batch.items()}
