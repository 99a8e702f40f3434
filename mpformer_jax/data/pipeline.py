"""Training and evaluation input pipelines (grain over TFDS ArrayRecord sources).

Training batches (per process, `b = global_batch_size / process_count`):

- `image` float32 `[b, H, W, 3]` normalised, `H, W = dataset.crop_size`;
- `segment_ids` int32 `[b, H, W]`, `ids` / `labels` int32 `[b, max_gt]`, `valid` bool
  `[b, max_gt]`: the fields of `mpformer_jax.targets.Targets`;
- `num_dropped` int32 `[b]`: segments that did not fit in `max_gt` (see `data.targets`).

The train stream is endless, shuffled every epoch, sharded by process (every process sees
different examples, the same number of them), and augmented with a generator seeded by
`(seed, epoch, example index)`, so batches do not depend on `worker_count`. Its iterator
checkpoints through `get_state()` / `set_state()` (bytes), so grain's `CheckpointHandler` saves
and restores it.

Evaluation batches cover the split exactly once, in order, with a padded last batch; see
`create_eval_loader` for the fields.
"""

from __future__ import annotations

import math
import sys

import grain
import jax
import numpy as np
from absl import logging

from mpformer_jax.data import panoptic_png, transforms
from mpformer_jax.data.config import (
  default_dataset_config,
  eval_original_canvas,
  validate_dataset_config,
)
from mpformer_jax.data.metadata import DatasetMetadata, dataset_metadata
from mpformer_jax.data.sources import open_source
from mpformer_jax.data.targets import panoptic_to_targets, segments_as_arrays

__all__ = [
  "GlobalBatchSampler",
  "EvalLoader",
  "TrainIterator",
  "create_eval_loader",
  "create_train_loader",
  "default_dataset_config",
  "global_batch",
]

TRAIN_KEYS = ("image", "segment_ids", "ids", "labels", "valid", "num_dropped")
# Semantic label of unlabelled pixels (`evaluation.evaluator.IGNORE_LABEL`).
SEMANTIC_IGNORE = 255
# Source reads (PNG decoding, which releases the GIL) run in these threads. grain's default
# buffers 500 decoded examples, too much memory for large images; 64 covers a few batches.
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)


class GlobalBatchSampler:
  """The endless, shuffled stream of training records, cut into global batches.

  Epoch `e` visits the records in the order `permutation(seed, e)`; the stream of all epochs
  is cut into global batches of `global_batch_size`, and process `p` of `P` takes rows
  `[p * b, (p + 1) * b)` of each (`b = global_batch_size / P`). So the global batch of a step
  is the same whatever the number of processes (it is assembled in process order by
  `jax.make_array_from_process_local_data`), and so is every example's augmentation, seeded
  by `(seed, epoch, record key)`.

  Index `i` is the `i`-th example of this process's stream. With `records`, the epochs visit
  only those record keys (permuted the same way, by position in `records`).
  """

  def __init__(
    self,
    num_records: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    seed: int,
    records: np.ndarray | None = None,
  ):
    self._records = None if records is None else np.asarray(records, np.int64)
    self._num_records = num_records if records is None else len(self._records)
    self._global = global_batch_size
    self._local = global_batch_size // process_count
    self._process = process_index
    self._seed = seed
    self._orders: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return sys.maxsize

  def __repr__(self) -> str:  # grain compares reprs to validate a restored state
    return (
      f"GlobalBatchSampler(num_records={self._num_records}, global={self._global}, "
      f"local={self._local}, process={self._process}, seed={self._seed})"
    )

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      if len(self._orders) > 4:
        self._orders.clear()
      rng = np.random.default_rng([self._seed, epoch])
      self._orders[epoch] = rng.permutation(self._num_records)
    return self._orders[epoch]

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    step, row = divmod(index, self._local)
    position = step * self._global + self._process * self._local + row
    epoch, offset = divmod(position, self._num_records)
    record = int(self._order(epoch)[offset])
    if self._records is not None:
      record = int(self._records[record])
    rng = transforms.example_rng(self._seed, epoch, record)
    return grain.RecordMetadata(index=index, record_key=record, rng=rng)


class _TrainExample(grain.transforms.RandomMap):
  """Decoded TFDS example -> augmented image and fixed-shape targets (`TRAIN_KEYS`)."""

  def __init__(self, config, meta: DatasetMetadata):
    # Plain values: the transform is pickled into worker processes.
    self._crop_size = tuple(config.crop_size)
    self._min_scale, self._max_scale = float(config.min_scale), float(config.max_scale)
    self._flip = bool(config.flip)
    self._task, self._max_gt = config.task, int(config.max_gt)
    self._things = meta.thing_category_ids
    self._category_to_label = meta.category_to_label
    self._short_side = None  # `short_side_transform`'s keyword arguments
    if config.augmentation == "short_side":
      settings = config.short_side
      self._short_side = {
        "sizes": tuple(int(v) for v in settings.sizes),
        "max_size": int(settings.max_size),
        "color_jitter": bool(settings.color_jitter),
        "single_category_max_area": float(settings.single_category_max_area),
        "ignore_label": int(settings.ignore_label),
      }
      # The crop constraint would take that category's pixels for void.
      ignore = self._short_side["ignore_label"]
      if settings.single_category_max_area < 1.0 and any(
        c["id"] == ignore for c in meta.categories
      ):
        raise ValueError(
          f"dataset.short_side.ignore_label = {ignore} is a category id of {meta.name!r}; "
          "pick a value no category uses"
        )

  def random_map(self, element, rng: np.random.Generator) -> dict[str, np.ndarray]:
    pan_ids = panoptic_png.rgb_to_id(element["panoptic"])
    if self._short_side is not None:
      image, pan_ids = self._short_side_transform(element, pan_ids, rng)
    else:
      image, pan_ids = transforms.train_transform(
        element["image"],
        pan_ids,
        rng,
        self._crop_size,
        self._min_scale,
        self._max_scale,
        self._flip,
      )
    targets = panoptic_to_targets(
      pan_ids,
      element["segments"],
      self._task,
      self._max_gt,
      self._things,
      self._category_to_label,
    )
    return {"image": image, **{k: targets[k] for k in TRAIN_KEYS[1:]}}

  def _short_side_transform(self, element, pan_ids, rng) -> tuple[np.ndarray, np.ndarray]:
    settings = self._short_side
    categories = None
    if settings["single_category_max_area"] < 1.0:  # only the crop constraint reads it
      seg = segments_as_arrays(element["segments"])
      categories = transforms.category_map(
        pan_ids, seg["id"], seg["category_id"], settings["ignore_label"]
      )
    return transforms.short_side_transform(
      element["image"],
      pan_ids,
      rng,
      self._crop_size,
      flip=self._flip,
      categories=categories,
      **settings,
    )


class TrainIterator:
  """The training batch iterator: grain's iterator plus a count of dropped segments.

  Attributes:
    num_dropped_total: segments dropped for lack of `max_gt` slots since this iterator was
      created (not part of the checkpointed state).
    num_examples: examples produced since this iterator was created.
    num_filtered_empty: training images left out by `dataset.filter_empty`.
  """

  def __init__(self, loader: grain.DataLoader, num_filtered_empty: int = 0):
    self._iterator = iter(loader)
    self.num_dropped_total = 0
    self.num_examples = 0
    self.num_filtered_empty = num_filtered_empty

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    dropped = int(batch["num_dropped"].sum())
    if dropped and not self.num_dropped_total:
      logging.warning(
        "dataset.max_gt is too small: %d segment(s) of this batch did not fit and were "
        "ignored; the batches' `num_dropped` counts them",
        dropped,
      )
    self.num_dropped_total += dropped
    self.num_examples += len(batch["num_dropped"])
    return batch

  def get_state(self) -> bytes:
    """Position of the stream (grain's JSON state)."""
    return self._iterator.get_state()

  def set_state(self, state: bytes) -> None:
    """Continues the stream from a `get_state()` result of an identically configured loader."""
    self._iterator.set_state(state)

  def start_prefetch(self) -> None:
    """Starts the workers early (grain's `CheckpointHandler.restore` calls it)."""
    self._iterator.start_prefetch()


def _processes(process_index, process_count) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in [0, {count})")
  return index, count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"global batch size {global_batch_size} must be a positive multiple of the process "
      f"count {process_count}"
    )
  return global_batch_size // process_count


def create_train_loader(
  config,
  global_batch_size: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int | None = None,
) -> TrainIterator:
  """The endless training stream of this process's batches.

  Args:
    config: dataset config (`default_dataset_config()` fields).
    global_batch_size: examples per step over all processes.
    seed: shuffle and augmentation seed, in `[0, 2**32)`.
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    worker_count: grain worker processes (default `config.worker_count`).

  Returns:
    A `TrainIterator` of dicts with the module docstring's fields.
  """
  validate_dataset_config(config)
  meta = dataset_metadata(config)
  index, count = _processes(process_index, process_count)
  local = _local_batch_size(global_batch_size, count)
  source = open_source(config, "train_split")
  records = None
  if config.task == "instance" and config.filter_empty:
    records = nonempty_instance_records(config, meta)
    logging.info(
      "dataset.filter_empty: %d of %d training images have no non-crowd thing segment and are "
      "left out (detectron2's FILTER_EMPTY_ANNOTATIONS)",
      len(source) - len(records),
      len(source),
    )
  num_records = len(source) if records is None else len(records)
  if num_records < count:
    raise ValueError(f"dataset.train_split has {num_records} usable examples for {count} processes")
  # The sampler already picks this process's rows of every global batch: the loader itself
  # reads the sampler's whole stream.
  loader = grain.DataLoader(
    data_source=source,
    sampler=GlobalBatchSampler(len(source), global_batch_size, index, count, seed, records),
    operations=[_TrainExample(config, meta), grain.transforms.Batch(local, drop_remainder=True)],
    worker_count=config.worker_count if worker_count is None else worker_count,
    worker_buffer_size=config.worker_buffer_size,
    shard_options=grain.sharding.NoSharding(),
    read_options=READ_OPTIONS,
  )
  return TrainIterator(loader, len(source) - num_records)


def nonempty_instance_records(config, meta: DatasetMetadata) -> np.ndarray:
  """Record keys of the train split with at least one non-crowd thing segment, increasing.

  detectron2's `filter_images_with_only_crowd_annotations`, which Mask2Former's instance
  datasets go through (`DATALOADER.FILTER_EMPTY_ANNOTATIONS`). Reads only the segment lists
  (images and maps stay encoded), once per loader.
  """
  source = open_source(config, "train_split", segments_only=True)
  things = np.asarray(meta.thing_category_ids, np.int64)
  keep = np.zeros(len(source), bool)
  for key in range(len(source)):
    seg = segments_as_arrays(source[key]["segments"])
    keep[key] = np.any(~seg["iscrowd"] & np.isin(seg["category_id"], things))
  return np.flatnonzero(keep)


class _EvalExample:
  """Record index -> evaluation example; index -1 gives an all-zero padding example."""

  def __init__(self, source, config, meta: DatasetMetadata, has_semantic: bool = False):
    self._source = source
    self._has_semantic = has_semantic
    # Category id -> training label for the `semantic` feature; void and categories outside
    # the task's labels are ignored (the evaluator's IGNORE_LABEL).
    self._semantic_lut = np.full(max(c["id"] for c in meta.categories) + 1, SEMANTIC_IGNORE)
    for category, label in meta.category_to_label.items():
      self._semantic_lut[category] = label
    self._eval_size = tuple(config.eval_size)
    self._original_canvas = eval_original_canvas(config)
    self._short_side, self._max_size = int(config.eval_short_side), int(config.eval_max_size)
    self._split = config.eval_split
    self._task, self._max_gt = config.task, int(config.max_gt)
    self._max_segments = int(config.eval_max_segments)
    self._things = meta.thing_category_ids
    self._category_to_label = meta.category_to_label

  def __call__(self, key: int) -> dict[str, np.ndarray]:
    if key < 0:
      return self._padding()
    element = self._source[key]
    original_ids = panoptic_png.rgb_to_id(element["panoptic"])
    name = self._name(key, element)
    canvas = self._original_canvas
    if original_ids.shape[0] > canvas[0] or original_ids.shape[1] > canvas[1]:
      raise ValueError(
        f"{name}: its original size {original_ids.shape} does not fit "
        f"dataset.eval_original_size {canvas} (predictions are scored at the original size); "
        "enlarge dataset.eval_original_size"
      )
    image, pan_ids, size = transforms.eval_transform(
      element["image"], original_ids, self._eval_size, self._short_side, self._max_size, name=name
    )
    targets = panoptic_to_targets(
      pan_ids,
      element["segments"],
      self._task,
      self._max_gt,
      self._things,
      self._category_to_label,
    )
    seg = segments_as_arrays(element["segments"])
    n, s = len(seg["id"]), self._max_segments
    if n > s:
      raise ValueError(
        f"dataset.eval_max_segments = {s}, but example {key} of the eval split has {n} "
        "segments; raise it (dropping ground truth would bias the metrics)"
      )
    labels = [self._category_to_label.get(int(c), -1) for c in seg["category_id"]]
    extra = {}
    if self._has_semantic:
      semantic = self._semantic_lut[np.asarray(element["semantic"])[..., 0]].astype(np.int32)
      padded = np.full(canvas, SEMANTIC_IGNORE, np.int32)
      padded[: semantic.shape[0], : semantic.shape[1]] = semantic
      extra["semantic_gt"] = padded
    return {
      **extra,
      "image": image,
      "is_real": np.bool_(True),
      "index": np.int32(key),
      "image_id": np.int32(element["image_id"]),
      "image_size": np.array(element["image"].shape[:2], np.int32),
      "resized_size": np.array(size, np.int32),
      "panoptic": transforms.pad_to(original_ids.astype(np.int32), canvas),
      "gt_ids": _pad(seg["id"].astype(np.int32), s, 0),
      "gt_labels": _pad(np.array(labels, np.int32), s, -1),
      "gt_isthing": _pad(np.isin(seg["category_id"], self._things), s, False),
      "gt_iscrowd": _pad(seg["iscrowd"], s, False),
      "gt_valid": np.arange(s) < n,
      **{k: targets[k] for k in TRAIN_KEYS[1:]},
    }

  def _name(self, key: int, element) -> str:
    """How errors name an example: its split, record index, image id and file, if stored."""
    name = f"example {key} of split {self._split!r} (image_id {int(element['image_id'])}"
    file_name = element.get("file_name")
    if file_name is not None:
      file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
      name += f", {file_name}"
    return name + ")"

  def _padding(self) -> dict[str, np.ndarray]:
    h, w = self._eval_size
    s, m = self._max_segments, self._max_gt
    oh, ow = self._original_canvas
    extra = {}
    if self._has_semantic:
      extra["semantic_gt"] = np.full((oh, ow), SEMANTIC_IGNORE, np.int32)
    return {
      **extra,
      "image": np.zeros((h, w, 3), np.float32),
      "is_real": np.bool_(False),
      "index": np.int32(-1),
      "image_id": np.int32(-1),
      "image_size": np.zeros(2, np.int32),
      "resized_size": np.zeros(2, np.int32),
      "panoptic": np.zeros((oh, ow), np.int32),
      "gt_ids": np.zeros(s, np.int32),
      "gt_labels": np.full(s, -1, np.int32),
      "gt_isthing": np.zeros(s, bool),
      "gt_iscrowd": np.zeros(s, bool),
      "gt_valid": np.zeros(s, bool),
      "segment_ids": np.zeros((h, w), np.int32),
      "ids": np.zeros(m, np.int32),
      "labels": np.zeros(m, np.int32),
      "valid": np.zeros(m, bool),
      "num_dropped": np.int32(0),
    }


def _pad(values: np.ndarray, length: int, fill) -> np.ndarray:
  out = np.full(length, fill, values.dtype)
  out[: len(values)] = values
  return out


class EvalLoader:
  """One ordered pass over this process's share of the eval split per `iter()`.

  Attributes:
    num_batches: batches per pass (the same on every process).
    num_examples: real examples in the whole split.
  """

  def __init__(self, batches: grain.MapDataset, num_examples: int, worker_count: int):
    self._batches = batches
    self._worker_count = worker_count
    self.num_batches = len(batches)
    self.num_examples = num_examples

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self):
    dataset = self._batches.to_iter_dataset(READ_OPTIONS)
    if self._worker_count:
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
    return iter(dataset)


def create_eval_loader(
  config,
  global_batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int | None = None,
) -> EvalLoader:
  """Ordered, single-pass evaluation batches; nothing is dropped, padding is flagged.

  Process `p` of `P` gets examples `p, p + P, p + 2P, ...`; every process yields the same
  number of batches (padded with `is_real = False` examples), as sharded steps need.

  Batch fields (`b = global_batch_size / P`, `H, W = dataset.eval_size`, `S =
  dataset.eval_max_segments`):

  - `image` float32 `[b, H, W, 3]`; `is_real` bool `[b]`; `index` int32 `[b]` (record index in
    the split, -1 for padding); `image_id` int32 `[b]`;
  - `image_size` int32 `[b, 2]`: the original `(h, w)`; `resized_size` int32 `[b, 2]`: the size
    of the image inside the padded canvas (after the test resize `dataset.eval_short_side`, or
    without one equal unless the image was larger than `eval_size`): crop predictions to it,
    then resize to `image_size` (the evaluator does both on device);
  - raw ground truth at the original size, top-left in the `dataset.eval_original_size` canvas
    `[Ho, Wo]` (`eval_original_canvas`; the reference scores there): `panoptic` int32
    `[b, Ho, Wo]` segment ids (0 = void and padding), and per segment `gt_ids` int32
    `[b, S]`, `gt_labels` int32 `[b, S]` (training label, -1 for categories outside the task's
    label space), `gt_isthing`, `gt_iscrowd`, `gt_valid` bool `[b, S]`;
  - only for datasets with a `semantic` feature (`ade20k_panoptic`): `semantic_gt` int32
    `[b, Ho, Wo]`, its training labels (255 where void or padding), which the semantic metrics
    score against instead of the panoptic map merged by class;
  - the training targets of the task at the eval resolution `[H, W]`, as in training batches
    (for an evaluation loss).

  Args:
    config: dataset config (`default_dataset_config()` fields).
    global_batch_size: examples per step over all processes.
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    worker_count: grain worker processes (default `config.worker_count`).
  """
  validate_dataset_config(config)
  meta = dataset_metadata(config)
  index, count = _processes(process_index, process_count)
  local = _local_batch_size(global_batch_size, count)
  source = open_source(config, "eval_split")
  num_batches = math.ceil(math.ceil(len(source) / count) / local)
  keys = list(range(index, len(source), count))
  keys += [-1] * (num_batches * local - len(keys))
  has_semantic = len(source) > 0 and "semantic" in source[0]
  example = _EvalExample(source, config, meta, has_semantic)
  batches = grain.MapDataset.source(keys).map(example).batch(local)
  workers = config.worker_count if worker_count is None else worker_count
  return EvalLoader(batches, len(source), workers)


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh, spec: jax.sharding.PartitionSpec):
  """Each process's local arrays -> global `jax.Array`s sharded by `spec` over `mesh`.

  Args:
    local_batch: dict (any pytree) of numpy arrays, leading axis = this process's examples.
    mesh: the device mesh.
    spec: partition spec of the leading (batch) axis, e.g. `P("data")`.

  Returns:
    The same structure of global arrays whose leading axis spans all processes.
  """
  sharding = jax.NamedSharding(mesh, spec)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
