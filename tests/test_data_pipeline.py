"""Targets from panoptic annotations, augmentation, and the grain train/eval loaders."""

from __future__ import annotations

import grain
import jax
import numpy as np
import pytest
from absl import flags
from etils import epath

from mpformer_jax.data import (
  dataset_metadata,
  default_dataset_config,
  panoptic_png,
  pipeline,
  sources,
  transforms,
)
from mpformer_jax.data.targets import panoptic_to_targets

# ---------------------------------------------------------------------------------------------
# Targets.

# A hand-made 6 x 6 annotation. Segments: A=100 sky (stuff), B=300 circle, C=70000 square (crowd),
# D=5 circle, E=9 grass (stuff), F=42 triangle (listed but without pixels); 4242 is unlisted.
PAN = np.array(
  [
    [100, 100, 100, 100, 100, 100],
    [100, 100, 300, 300, 9, 9],
    [0, 300, 300, 300, 9, 9],
    [70000, 70000, 5, 5, 9, 9],
    [70000, 4242, 5, 5, 9, 9],
    [9, 9, 9, 9, 9, 9],
  ],
  np.int32,
)
SEGMENTS = [
  {"id": 100, "category_id": 10, "iscrowd": False},
  {"id": 300, "category_id": 1, "iscrowd": False},
  {"id": 70000, "category_id": 2, "iscrowd": True},
  {"id": 5, "category_id": 1, "iscrowd": False},
  {"id": 9, "category_id": 11, "iscrowd": False},
  {"id": 42, "category_id": 4, "iscrowd": False},
]
THINGS = (1, 2, 4, 5, 7)
# Synthetic categories in order: 1, 2, 4, 5, 7 (things), 10, 11, 13 (stuff).
PANOPTIC_LABELS = {1: 0, 2: 1, 4: 2, 5: 3, 7: 4, 10: 5, 11: 6, 13: 7}
INSTANCE_LABELS = {1: 0, 2: 1, 4: 2, 5: 3, 7: 4}


def _remap(mapping):
  """Expected id map: `PAN` with each id replaced by `mapping.get(id, 0)`."""
  return np.vectorize(lambda v: mapping.get(int(v), 0))(PAN).astype(np.int32)


def test_panoptic_targets():
  t = panoptic_to_targets(PAN, SEGMENTS, "panoptic", 8, THINGS, PANOPTIC_LABELS)
  np.testing.assert_array_equal(t["ids"], [100, 300, 5, 9, 0, 0, 0, 0])
  np.testing.assert_array_equal(t["labels"], [5, 0, 0, 6, 0, 0, 0, 0])
  np.testing.assert_array_equal(t["valid"], [1, 1, 1, 1, 0, 0, 0, 0])
  # Crowd, unlisted and void pixels belong to no target.
  np.testing.assert_array_equal(t["segment_ids"], _remap({100: 100, 300: 300, 5: 5, 9: 9}))
  assert t["num_dropped"] == 0 and t["num_empty"] == 1  # F has no pixels
  assert t["segment_ids"].dtype == t["ids"].dtype == t["labels"].dtype == np.int32
  # TFDS' decoding (a dict of columns) gives the same result.
  columns = {k: [s[k] for s in SEGMENTS] for k in ("id", "category_id", "iscrowd")}
  again = panoptic_to_targets(PAN, columns, "panoptic", 8, THINGS, PANOPTIC_LABELS)
  for key, value in t.items():
    np.testing.assert_array_equal(again[key], value)


def test_overflow_keeps_the_largest_segments_and_counts_the_rest():
  t = panoptic_to_targets(PAN, SEGMENTS, "panoptic", 2, THINGS, PANOPTIC_LABELS)
  # Areas: A 8, B 5, D 4, E 14 -> E and A stay, in their original order.
  np.testing.assert_array_equal(t["ids"], [100, 9])
  np.testing.assert_array_equal(t["labels"], [5, 6])
  assert t["valid"].all() and t["num_dropped"] == 2
  np.testing.assert_array_equal(t["segment_ids"], _remap({100: 100, 9: 9}))


def test_instance_targets_keep_things_only():
  t = panoptic_to_targets(PAN, SEGMENTS, "instance", 4, THINGS, INSTANCE_LABELS)
  np.testing.assert_array_equal(t["ids"], [300, 5, 0, 0])
  np.testing.assert_array_equal(t["labels"], [0, 0, 0, 0])
  np.testing.assert_array_equal(t["valid"], [1, 1, 0, 0])
  np.testing.assert_array_equal(t["segment_ids"], _remap({300: 300, 5: 5}))
  assert t["num_dropped"] == 0 and t["num_empty"] == 1


def test_semantic_targets_merge_segments_of_a_class():
  t = panoptic_to_targets(PAN, SEGMENTS, "semantic", 4, THINGS, PANOPTIC_LABELS)
  # Classes present: circle (B + D) 0, the crowd square 1 (semantic labels keep crowd regions,
  # as the reference's do), sky 5, grass 6; ids are label + 1.
  np.testing.assert_array_equal(t["ids"], [1, 2, 6, 7])
  np.testing.assert_array_equal(t["labels"], [0, 1, 5, 6])
  np.testing.assert_array_equal(t["valid"], [1, 1, 1, 1])
  np.testing.assert_array_equal(t["segment_ids"], _remap({300: 1, 5: 1, 70000: 2, 100: 6, 9: 7}))
  assert t["num_dropped"] == 0 and t["num_empty"] == 1  # triangle (F) has no pixels


def test_target_errors():
  bad = [*SEGMENTS, {"id": 77, "category_id": 99, "iscrowd": False}]
  with pytest.raises(ValueError, match="99"):
    panoptic_to_targets(PAN, bad, "panoptic", 8, THINGS, PANOPTIC_LABELS)
  with pytest.raises(ValueError, match="task"):
    panoptic_to_targets(PAN, SEGMENTS, "detection", 8, THINGS, PANOPTIC_LABELS)
  with pytest.raises(ValueError, match="unique"):
    panoptic_to_targets(PAN, [*SEGMENTS, SEGMENTS[0]], "panoptic", 8, THINGS, PANOPTIC_LABELS)


# ---------------------------------------------------------------------------------------------
# Transforms.

PALETTE = np.array([[0, 0, 0], [250, 10, 10], [10, 250, 10], [10, 10, 250]], np.uint8)


def _two_tone(h=48, w=80):
  """An asymmetric scene: id 1 on the left third, id 2 elsewhere, id 3 a block at the top right."""
  ids = np.full((h, w), 2, np.int32)
  ids[:, : w // 3] = 1
  ids[: h // 4, -w // 4 :] = 3
  return PALETTE[ids], ids


def _denormalize(image):
  return image * transforms.PIXEL_STD + transforms.PIXEL_MEAN


def test_train_transform_keeps_image_and_ids_aligned():
  image, ids = _two_tone()
  flips = 0
  for seed in range(8):
    rng = transforms.example_rng(seed, 0, 0)
    out_image, out_ids = transforms.train_transform(image, ids, rng, (64, 64), 0.5, 2.0, True)
    assert out_image.shape == (64, 64, 3) and out_image.dtype == np.float32
    assert out_ids.shape == (64, 64) and out_ids.dtype == np.int32
    # Away from boundaries (bilinear vs nearest), every pixel has its id's colour.
    interior = np.ones((64, 64), bool)
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        shifted = np.roll(np.roll(out_ids, dy, 0), dx, 1)
        interior &= shifted == out_ids
    interior[[0, -1]] = interior[:, [0, -1]] = False
    labelled = interior & (out_ids > 0)
    assert labelled.sum() > 100
    np.testing.assert_allclose(
      _denormalize(out_image)[labelled], PALETTE[out_ids[labelled]], atol=2
    )
    # Padding is void and the mean colour.
    np.testing.assert_allclose(out_image[out_ids == 0][interior[out_ids == 0]], 0, atol=1e-5)
    # The left-third segment (id 1) ends up on the right when the image was flipped.
    cols = np.nonzero(out_ids == 1)[1]
    if len(cols) and len(np.nonzero(out_ids == 2)[1]):
      flipped = cols.mean() > np.nonzero(out_ids == 2)[1].mean()
      flips += flipped
  assert 0 < flips < 8  # both outcomes occur


def test_flip_is_an_exact_mirror():
  image, ids = _two_tone(64, 64)
  outcomes = set()
  for seed in range(6):
    rng = transforms.example_rng(seed, 1, 2)
    # Scale 1 and crop = image size: the only randomness left is the flip.
    out_image, out_ids = transforms.train_transform(image, ids, rng, (64, 64), 1.0, 1.0, True)
    flipped = np.array_equal(out_ids, ids[:, ::-1])
    assert flipped or np.array_equal(out_ids, ids)
    expected = image[:, ::-1] if flipped else image
    np.testing.assert_allclose(out_image, transforms.normalize(expected), atol=1e-6)
    outcomes.add(flipped)
  assert outcomes == {True, False}


def test_random_crop_is_a_window_of_the_rescaled_image():
  ids = np.arange(1, 48 * 80 + 1, dtype=np.int32).reshape(48, 80)  # every pixel distinct
  image = np.zeros((48, 80, 3), np.uint8)
  # Scale 2: fit into 128 x 128 -> factor min(128 / 48, 128 / 80) = 1.6 -> 77 x 128.
  big = transforms.resize_ids(ids, (77, 128))
  windows = set()
  for seed in range(6):
    rng = transforms.example_rng(seed, 0, 0)
    _, out = transforms.train_transform(image, ids, rng, (64, 64), 2.0, 2.0, False)
    found = [
      (top, left)
      for top in range(77 - 64 + 1)
      for left in range(128 - 64 + 1)
      if np.array_equal(big[top : top + 64, left : left + 64], out)
    ]
    assert len(found) == 1
    windows.add(found[0])
  assert len(windows) == 6


def test_train_transform_is_deterministic_by_seed():
  image, ids = _two_tone()
  run = lambda *key: transforms.train_transform(
    image, ids, transforms.example_rng(*key), (64, 64), 0.5, 2.0, True
  )
  a, b, c = run(0, 3, 7), run(0, 3, 7), run(0, 4, 7)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])  # another epoch, another augmentation


def test_eval_transform_pads_and_shrinks_to_fit():
  image, ids = _two_tone(48, 80)
  out_image, out_ids, size = transforms.eval_transform(image, ids, (64, 96))
  assert size == (48, 80) and out_image.shape == (64, 96, 3)
  np.testing.assert_array_equal(out_ids[:48, :80], ids)
  assert not out_ids[48:].any() and not out_ids[:, 80:].any()
  np.testing.assert_allclose(out_image[:48, :80], transforms.normalize(image), atol=1e-6)
  np.testing.assert_allclose(out_image[48:], 0)
  # Too large: shrinks (keeping the aspect ratio) into the canvas.
  _, small_ids, size = transforms.eval_transform(image, ids, (32, 32))
  assert size == (19, 32)
  assert set(np.unique(small_ids[:19])) == {1, 2, 3} and not small_ids[19:].any()


def test_normalize_uses_detectron2_statistics():
  pixel = np.array([[[123.675, 116.28, 103.53]]]).round().astype(np.uint8)
  assert np.abs(transforms.normalize(pixel)).max() < 0.01
  white = transforms.normalize(np.full((1, 1, 3), 255, np.uint8))
  np.testing.assert_allclose(white[0, 0], (255 - transforms.PIXEL_MEAN) / transforms.PIXEL_STD)


# ---------------------------------------------------------------------------------------------
# Loaders.


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  c = default_dataset_config()
  c.data_dir = str(tmp_path_factory.mktemp("tfds"))
  c.synthetic.image_size = (64, 64)
  c.synthetic.num_train, c.synthetic.num_validation = 16, 8
  c.crop_size = c.eval_size = (64, 64)
  c.max_gt = 8
  sources.open_source(c, "train_split")  # build once for the module
  return c


def _copy(config, **changes):
  c = config.copy_and_resolve_references()
  c.update(changes)
  return c


def test_train_batch_shapes_and_targets(config):
  it = pipeline.create_train_loader(config, 4, seed=0, process_index=0, process_count=1)
  batch = next(it)
  assert set(batch) == set(pipeline.TRAIN_KEYS)
  assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.float32
  assert batch["segment_ids"].shape == (4, 64, 64) and batch["segment_ids"].dtype == np.int32
  for key, dtype in (("ids", np.int32), ("labels", np.int32), ("valid", np.bool_)):
    assert batch[key].shape == (4, 8) and batch[key].dtype == dtype
  assert batch["num_dropped"].shape == (4,) and batch["num_dropped"].dtype == np.int32
  num_classes = dataset_metadata(config).num_classes
  for b in range(4):
    valid = batch["valid"][b]
    assert valid.any()
    for j in np.nonzero(valid)[0]:  # every valid slot has pixels, and a label in range
      assert np.any(batch["segment_ids"][b] == batch["ids"][b, j])
      assert 0 <= batch["labels"][b, j] < num_classes
    assert not batch["ids"][b, ~valid].any()
    # Pixels not covered by a valid slot are 0.
    covered = np.isin(batch["segment_ids"][b], batch["ids"][b, valid])
    assert not batch["segment_ids"][b][~covered].any()


def test_dropped_segments_are_counted_and_reported(config, caplog):
  it = pipeline.create_train_loader(
    _copy(config, max_gt=1), 4, seed=0, process_index=0, process_count=1
  )
  with caplog.at_level("WARNING"):
    batch = next(it)
  assert batch["valid"].all() and batch["num_dropped"].sum() > 0
  assert it.num_dropped_total == batch["num_dropped"].sum()
  assert "max_gt" in caplog.text


def _identity_config(config):
  """No augmentation: training images are the normalised source images."""
  return _copy(config, min_scale=1.0, max_scale=1.0, flip=False)


def _source_index(config, split_field="train_split"):
  """Lookup from a normalised image to its record index."""
  source = sources.open_source(config, split_field)
  return {transforms.normalize(source[i]["image"]).tobytes(): i for i in range(len(source))}


def test_processes_split_the_same_global_batches(config):
  """Two processes' local batches, in process order, are the one-process global batches."""
  c = _identity_config(config)
  index_of = _source_index(c)
  single = pipeline.create_train_loader(c, 4, seed=1, process_index=0, process_count=1)
  parts = [
    pipeline.create_train_loader(c, 4, seed=1, process_index=p, process_count=2) for p in (0, 1)
  ]
  seen = []
  for _ in range(6):  # 24 examples: crosses the epoch boundary at 16
    whole = next(single)
    halves = [next(it) for it in parts]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
    seen += [index_of[x.tobytes()] for x in whole["image"]]
  assert sorted(seen[:16]) == list(range(16))  # every record once per epoch


def test_shuffle_depends_on_the_seed(config):
  c = _identity_config(config)
  index_of = _source_index(c)
  orders = []
  for seed in (0, 0, 5):
    it = pipeline.create_train_loader(c, 8, seed=seed, process_index=0, process_count=1)
    orders.append([index_of[x.tobytes()] for x in next(it)["image"]])
  assert orders[0] == orders[1] != orders[2]


def test_augmentation_seed_does_not_depend_on_process_count():
  draws = {}
  for count in (1, 2):
    for process in range(count):
      sampler = pipeline.GlobalBatchSampler(16, 4, process, count, seed=3)
      for position in range(16 // count):  # epoch 0
        meta = sampler[position]
        draw = meta.rng.random()
        assert draws.setdefault(meta.record_key, draw) == draw
  assert len(draws) == 16
  # The next epoch gets new augmentations.
  meta = pipeline.GlobalBatchSampler(16, 4, 0, 1, seed=3)[16]
  assert meta.rng.random() != draws[meta.record_key]


def test_iterator_state_round_trip(config):
  it = pipeline.create_train_loader(config, 4, seed=2, process_index=0, process_count=1)
  for _ in range(3):  # cross the epoch boundary (16 records = 4 batches) after restoring
    next(it)
  state = it.get_state()
  assert isinstance(state, bytes)
  expected = [next(it) for _ in range(3)]
  restored = pipeline.create_train_loader(config, 4, seed=2, process_index=0, process_count=1)
  first = next(restored)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert not np.array_equal(first["image"], expected[0]["image"])


def test_grain_checkpoint_handler_round_trip(config, tmp_path):
  it = pipeline.create_train_loader(config, 4, seed=6, process_index=0, process_count=1)
  next(it)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), it)
  want = next(it)
  restored = pipeline.create_train_loader(config, 4, seed=6, process_index=0, process_count=1)
  handler.restore(epath.Path(tmp_path), restored)
  got = next(restored)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])


def test_batches_do_not_depend_on_worker_count(config):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; pytest does not parse them
  batches = []
  for workers in (0, 1):
    it = pipeline.create_train_loader(
      config, 4, seed=4, process_index=0, process_count=1, worker_count=workers
    )
    batches.append([next(it) for _ in range(2)])
  for a, b in zip(*batches, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_eval_loader_covers_every_example_once(config):
  index_of = _source_index(config, "eval_split")
  source = sources.open_source(config, "eval_split")
  meta = dataset_metadata(config)
  real = []
  num_batches = set()
  for process in (0, 1):
    loader = pipeline.create_eval_loader(config, 6, process_index=process, process_count=2)
    num_batches.add(len(loader))
    batches = list(loader)
    assert len(batches) == len(loader) == 2  # 4 examples per process, local batch 3
    for batch in batches:
      assert batch["image"].shape == (3, 64, 64, 3) and batch["panoptic"].shape == (3, 64, 64)
      assert batch["gt_ids"].shape == (3, config.eval_max_segments)
      for b in range(3):
        if not batch["is_real"][b]:
          assert batch["index"][b] == -1 and not batch["gt_valid"][b].any()
          assert not batch["panoptic"][b].any()
          continue
        i = int(batch["index"][b])
        real.append(i)
        assert index_of[batch["image"][b].tobytes()] == i
        example = source[i]
        np.testing.assert_array_equal(batch["image_size"][b], [64, 64])
        np.testing.assert_array_equal(batch["resized_size"][b], [64, 64])
        np.testing.assert_array_equal(
          batch["panoptic"][b], panoptic_png.rgb_to_id(example["panoptic"])
        )
        n = len(example["segments"]["id"])
        assert batch["gt_valid"][b].sum() == n
        np.testing.assert_array_equal(batch["gt_ids"][b, :n], example["segments"]["id"])
        labels = [meta.category_to_label[int(c)] for c in example["segments"]["category_id"]]
        np.testing.assert_array_equal(batch["gt_labels"][b, :n], labels)
        isthing = [int(c) in meta.thing_category_ids for c in example["segments"]["category_id"]]
        np.testing.assert_array_equal(batch["gt_isthing"][b, :n], isthing)
  assert num_batches == {2}
  assert sorted(real) == list(range(8))
  # One process: in order, the last batch padded.
  loader = pipeline.create_eval_loader(config, 3, process_index=0, process_count=1)
  batches = list(loader)
  np.testing.assert_array_equal(
    np.concatenate([b["index"] for b in batches]), [0, 1, 2, 3, 4, 5, 6, 7, -1]
  )
  assert list(loader)[0]["index"].tolist() == [0, 1, 2]  # every iter() is a fresh pass


def test_global_batch_is_sharded_over_the_mesh(config):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  spec = jax.sharding.PartitionSpec("data")
  it = pipeline.create_train_loader(config, 8, seed=0, process_index=0, process_count=1)
  local = next(it)
  batch = pipeline.global_batch(local, mesh, spec)
  assert set(batch) == set(local)
  for key, x in batch.items():
    assert isinstance(x, jax.Array) and x.shape == local[key].shape
    assert x.sharding == jax.NamedSharding(mesh, spec)
    shards = x.addressable_shards
    assert len(shards) == 8 and all(s.data.shape[0] == 1 for s in shards)
    np.testing.assert_array_equal(np.asarray(x), local[key])


def test_config_validation(config):
  meta = dataset_metadata(config)
  assert meta.num_classes == 8 and sum(meta.label_isthing) == 5
  assert config.num_classes == 8  # the default names the dataset's class count
  assert dataset_metadata(_copy(config, task="instance", num_classes=5)).num_classes == 5
  assert dataset_metadata(_copy(config, task="instance", num_classes=None)).num_classes == 5
  with pytest.raises(ValueError, match="dataset.num_classes"):
    dataset_metadata(_copy(config, task="instance"))  # 8 classes, but instance has 5
  with pytest.raises(ValueError, match="dataset.num_classes"):
    pipeline.create_train_loader(_copy(config, num_classes=133), 4, seed=0)
  with pytest.raises(ValueError, match="dataset.crop_size"):
    pipeline.create_train_loader(_copy(config, crop_size=(60, 64)), 4, seed=0)
  with pytest.raises(ValueError, match="dataset.task"):
    pipeline.create_train_loader(_copy(config, task="detection"), 4, seed=0)
  with pytest.raises(ValueError, match="dataset.min_scale"):
    pipeline.create_eval_loader(_copy(config, min_scale=3.0), 4)
  with pytest.raises(ValueError, match="dataset.eval_split"):
    pipeline.create_eval_loader(_copy(config, eval_split="test"), 4)
  with pytest.raises(ValueError, match="multiple of the process count"):
    pipeline.create_train_loader(config, 3, seed=0, process_index=0, process_count=2)
