"""Shared pieces of the per-task paper configurations (`configs/<dataset>_<task>_<backbone>.py`).

The task files are thin: each parses its `arg`, picks a dataset config and a schedule from here
and calls `paper_config`. Every number carries its source: `[M2F]` is
facebookresearch/Mask2Former @9b0651c, `[MP]` IDEA-Research/MP-Former @a71f504 (both as read
in the reference spec, `mpformer_spec.md`, sections 1.1, 2.1, 3 and 4); "[inference]" marks our
own choices where neither codebase fixes a number.

What stays as `config_lib` sets it, for every task (spec sections 3 and 4, "All tasks use"):
AdamW lr 1e-4, weight decay 0.05, backbone x0.1, full-model clipping 0.01, batch 16, 12544
points (oversample 3.0, importance 0.75), class / mask / dice weights 2 / 5 / 5, no-object 0.1,
9 decoder layers; MP-Former's released mask-pilot settings (spec 1.1, `[MP]
run_50ep_no_noise_all_ly.sh` lines 9-23): 1 group (`NUM_DN`), label-flip noise 0.2
(`LB_NOISE_RATIO`), point-noise scale 0.0 (`NOISE_SCALE`), GT masks in all layers
(`ALL_LY_DN`), 4 images per reference GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import ml_collections

from mpformer_jax import config_lib
from mpformer_jax.data.config import default_dataset_config

VARIANTS = ("mp_former", "mask2former")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A training length and learning-rate schedule (`optimizer.schedule` and friends).

  Attributes:
    total_steps: iterations (`SOLVER.MAX_ITER`).
    kind: "poly" (detectron2's WarmupPolyLR, power 0.9) or "step" (WarmupMultiStepLR, x0.1).
    decay_steps: "step" only: `SOLVER.STEPS`.
    warmup_steps: `SOLVER.WARMUP_ITERS`. Every config that has warmup uses `WARMUP_FACTOR`
      1.0, so the warmup is a no-op kept for fidelity.
  """

  total_steps: int
  kind: str
  decay_steps: tuple[int, ...] = ()
  warmup_steps: int = 0


# COCO, R50 (spec section 4). The 50-epoch schedule is [M2F]'s
# (configs/coco/{instance,panoptic}-segmentation/Base-COCO-*.yaml:19-41: 368,750 iterations,
# steps (327778, 355092), WARMUP_ITERS 10 at factor 1.0). The shorter ones are [MP]'s
# configs/coco/instance-segmentation/maskformer2_R50_bs16_{12,24,36}ep_DN_query.yaml; [MP] ships
# panoptic only as configs/coco/panoptic-segmentation/maskformer2_R50_bs16_{12,36}ep.yaml (same
# numbers), so panoptic 24ep borrows the instance one.
COCO_SCHEDULES = {
  "12ep": Schedule(88_500, "step", (73_750, 81_125), 10),
  "24ep": Schedule(177_000, "step", (162_250, 169_625), 10),
  "36ep": Schedule(265_500, "step", (245_000, 260_000), 10),
  "50ep": Schedule(368_750, "step", (327_778, 355_092), 10),
}
# COCO, Swin-L: [M2F]'s 100 epochs (configs/coco/*/swin/maskformer2_swin_large_IN21k_384_bs16_
# 100ep.yaml, spec section 4: 737,500 iterations, steps (655556, 710184)).
COCO_SWIN_SCHEDULES = {"100ep": Schedule(737_500, "step", (655_556, 710_184), 10)}
# COCO instance, Swin-L: [MP]'s early-drop variants (configs/coco/instance-segmentation/swin/
# maskformer2_swin_large_IN21k_384_bs16_100ep_drop*.yaml, spec section 4), named by their
# file suffix. Their base is the 100ep config; only MAX_ITER and STEPS change.
COCO_SWIN_INSTANCE_SCHEDULES = {
  **COCO_SWIN_SCHEDULES,
  "drop": Schedule(250_000, "step", (145_000, 175_000), 10),
  "drop169999": Schedule(250_000, "step", (170_000, 200_000), 10),
  "drop269999": Schedule(350_000, "step", (270_000, 300_000), 10),
  "drop394999": Schedule(450_000, "step", (395_000, 425_000), 10),
}
# ADE20K: [M2F]'s 160k poly (configs/ade20k/semantic-segmentation/Base-ADE20K-Semantic
# Segmentation.yaml, WARMUP_ITERS 0) or [MP]'s configs/ade20k/*/..._160k[_res640]_steplr.yaml
# (steps (135000, 150000), WARMUP_ITERS 10 at factor 1.0).
ADE20K_SCHEDULES = {
  "poly": Schedule(160_000, "poly"),
  "steplr": Schedule(160_000, "step", (135_000, 150_000), 10),
}
# Cityscapes: [M2F]'s 90k poly (configs/cityscapes/*/Base-Cityscapes-*.yaml, WARMUP 0) or [MP]'s
# configs/cityscapes/*/maskformer2_R50_bs16_90k_steplr.yaml (steps (80000, 85000)). [MP] also
# edited configs/cityscapes/panoptic-segmentation/maskformer2_R50_bs16_90k.yaml in place to this
# step schedule.
CITYSCAPES_SCHEDULES = {
  "poly": Schedule(90_000, "poly"),
  "steplr": Schedule(90_000, "step", (80_000, 85_000), 10),
}
# [MP] configs/cityscapes/semantic-segmentation/maskformer2_R50_bs16_150k_steplr.yaml: 150k
# iterations with the 90k config's steps, as shipped (spec section 4).
CITYSCAPES_SEMANTIC_SCHEDULES = {
  **CITYSCAPES_SCHEDULES,
  "150k_steplr": Schedule(150_000, "step", (80_000, 85_000), 10),
}

# [inference] Slots for the raw ground truth of an evaluation image. An overflow is an error
# (never a silent drop) and a slot costs a few integers, so this is generous.
EVAL_MAX_SEGMENTS = 256


def parse_options(
  arg: str, file: str, schedules: Mapping[str, Schedule], default_schedule: str
) -> tuple[str, str]:
  """`"mask2former,12ep"` -> `(variant, schedule name)`; missing parts take the defaults.

  Args:
    arg: the comma-separated options after `:` in `--config FILE:arg` ("" for none).
    file: the config file, for error messages.
    schedules: this file's schedule names.
    default_schedule: the schedule used when `arg` names none.

  Raises:
    ValueError: naming `file` and the option, for an unknown option or two options of a kind.
  """
  variant = schedule = None
  for option in (o.strip() for o in arg.split(",")):
    if not option:
      continue
    if option in VARIANTS:
      if variant is not None:
        raise ValueError(f"{file}: option {option!r}: the variant is already {variant!r}")
      variant = option
    elif option in schedules:
      if schedule is not None:
        raise ValueError(f"{file}: option {option!r}: the schedule is already {schedule!r}")
      schedule = option
    else:
      raise ValueError(
        f"{file}: unknown option {option!r}; expected a variant {VARIANTS} and/or a schedule "
        f"{tuple(schedules)}"
      )
  return variant or VARIANTS[0], schedule or default_schedule


def coco_dataset(task: str) -> ml_collections.ConfigDict:
  """COCO 2017 panoptic (133 classes) or instance (80) with Mask2Former's LSJ (spec section 4).

  Instance uses its own dataset name: Mask2Former trains it on `instances_train2017.json`,
  whose masks may overlap, which one panoptic id map cannot hold.
  """
  names = {"panoptic": ("coco_panoptic", 133), "instance": ("coco_instance", 80)}
  dataset = default_dataset_config()
  dataset.name, dataset.num_classes = names[task]
  dataset.task = task
  # [M2F] Base-COCO-*.yaml (spec section 4): ResizeScale(0.1, 2.0, target 1024) +
  # FixedSizeCrop(1024): our "lsj" with these numbers.
  dataset.augmentation = "lsj"
  dataset.crop_size = (1024, 1024)
  dataset.min_scale, dataset.max_scale = 0.1, 2.0
  # [inference] The reference has no cap. COCO's busiest images carry about a hundred
  # annotated segments; 128 leaves margin, and drops are counted (`segments_dropped`). The
  # cost is the mask pilot's block of `groups * max_gt` queries.
  dataset.max_gt = 128
  # detectron2's default test resize (spec section 4: short 800, max 1333). The canvas holds
  # either orientation: 1333 rounded up to a multiple of 32.
  dataset.eval_short_side, dataset.eval_max_size = 800, 1333
  dataset.eval_size = (1344, 1344)
  # Scoring happens at the original size (spec section 5); no COCO image is longer than 640.
  dataset.eval_original_size = (640, 640)
  dataset.eval_max_segments = EVAL_MAX_SEGMENTS
  return dataset


def ade20k_dataset(backbone: str, task: str = "semantic") -> ml_collections.ConfigDict:
  """ADE20K (150 classes, 100 of them things) for one task, with the short-side augmentation.

  The semantic task reads `ade20k_semantic` (the SceneParsing annotations, as [M2F]'s semantic
  models do). Panoptic and instance read `ade20k_panoptic`, [M2F]'s panoptic ground truth
  (datasets/prepare_ade20k_pan_seg.py): its things are the masks of [M2F]'s instance ground
  truth (prepare_ade20k_ins_seg.py), and the instance task keeps the 100 thing classes.

  Args:
    backbone: "resnet50" or "swin_large". Semantic crops 512 (ResNet-50) or 640 (Swin-L,
      [M2F]'s `_res640` config); panoptic and instance crop 640 with either.
    task: "semantic", "panoptic" or "instance".
  """
  if task not in ("semantic", "panoptic", "instance"):
    raise ValueError(f"task: expected semantic, panoptic or instance, got {task!r}")
  base = 640 if backbone == "swin_large" or task != "semantic" else 512
  dataset = default_dataset_config()
  if task == "semantic":
    dataset.name, dataset.task, dataset.num_classes = "ade20k_semantic", "semantic", 150
  else:
    dataset.name, dataset.task = "ade20k_panoptic", task
    dataset.num_classes = 100 if task == "instance" else 150
  dataset.augmentation = "short_side"
  # [M2F] configs/ade20k/semantic-segmentation/Base-ADE20K-SemanticSegmentation.yaml (spec
  # section 4) and, for 640, [MP] .../swin/maskformer2_swin_large_IN21k_384_bs16_160k_res640_
  # steplr.yaml; panoptic / instance: [M2F] configs/ade20k/{panoptic,instance}-segmentation/
  # Base-ADE20K-{Panoptic,Instance}Segmentation.yaml (spec 4, base 640): MIN_SIZE_TRAIN
  # [int(x * 0.1 * base) for x in range(5, 21)], MAX_SIZE_TRAIN 4 * base, crop base x base with
  # SINGLE_CATEGORY_MAX_AREA 1.0 (the instance mapper's plain RandomCrop is the same crop),
  # COLOR_AUG_SSD, flip; the mapper pads to SIZE_DIVISIBILITY = base (our pad to crop_size).
  dataset.crop_size = (base, base)
  dataset.short_side.sizes = tuple(int(x * 0.1 * base) for x in range(5, 21))
  dataset.short_side.max_size = 4 * base
  dataset.short_side.single_category_max_area = 1.0
  dataset.short_side.color_jitter = True
  if task == "semantic":
    # A semantic target is one segment per class present: 150 slots can never overflow.
    dataset.max_gt = 150
  else:
    # [inference] The reference has no cap. ADE20K scenes can be busy (rooms full of chairs,
    # books, bottles); 128 leaves margin, and drops are counted (`segments_dropped`). The cost
    # is the mask pilot's block of `groups * max_gt` queries.
    dataset.max_gt = 128
  # MIN_SIZE_TEST base, MAX_SIZE_TEST 4 * base. [inference] The canvas holds either
  # orientation of the longest resize (a 16x larger canvas than a typical 4:3 image needs).
  dataset.eval_short_side, dataset.eval_max_size = base, 4 * base
  dataset.eval_size = (4 * base, 4 * base)
  dataset.eval_max_segments = EVAL_MAX_SEGMENTS
  return dataset


def cityscapes_dataset(task: str) -> ml_collections.ConfigDict:
  """Cityscapes fine (19 classes, 8 of them things) for one task, short-side augmentation.

  All three tasks read the same dataset: Cityscapes instances do not overlap, so one panoptic
  id map per image holds every task's ground truth; the instance task keeps the things.
  """
  dataset = default_dataset_config()
  dataset.name, dataset.task = "cityscapes", task
  dataset.num_classes = 8 if task == "instance" else 19
  dataset.augmentation = "short_side"
  # [M2F] configs/cityscapes/*/Base-Cityscapes-*.yaml (spec section 4): MIN_SIZE_TRAIN
  # [int(x * 0.1 * 1024) for x in range(5, 21)] (512...2048), MAX_SIZE_TRAIN 4096, crop
  # 512 x 1024 (SINGLE_CATEGORY_MAX_AREA 1.0), COLOR_AUG_SSD, flip.
  dataset.crop_size = (512, 1024)
  dataset.short_side.sizes = tuple(int(x * 0.1 * 1024) for x in range(5, 21))
  dataset.short_side.max_size = 4096
  dataset.short_side.single_category_max_area = 1.0
  dataset.short_side.color_jitter = True
  # Semantic: one segment per class, so 19 slots never overflow. [inference] Instance and
  # panoptic: crowded street scenes hold many people and cars; 128 leaves margin, and drops are
  # counted.
  dataset.max_gt = 19 if task == "semantic" else 128
  # MIN_SIZE_TEST 1024, MAX_SIZE_TEST 2048: every Cityscapes image is 1024 x 2048 already.
  dataset.eval_short_side, dataset.eval_max_size = 1024, 2048
  dataset.eval_size = (1024, 2048)
  dataset.eval_max_segments = EVAL_MAX_SEGMENTS
  return dataset


def paper_config(
  dataset: ml_collections.ConfigDict,
  backbone: str,
  variant: str,
  schedule: Schedule,
  num_queries: int = 100,
  resnet_norm: str = "frozen_bn",
) -> ml_collections.ConfigDict:
  """A whole paper run: `config_lib`'s reference settings plus the task's specifics.

  Args:
    dataset: from `coco_dataset`, `ade20k_dataset` or `cityscapes_dataset`.
    backbone: "resnet50" or "swin_large" (embed 192, depths 2/2/18/2, window 12, drop path 0.3;
      the reference's `PRETRAIN_IMG_SIZE` 384 only matters with an absolute position
      embedding, which Mask2Former turns off, `APE: False`).
    variant: "mp_former" (no query positional embedding, mask pilot on) or "mask2former".
    schedule: training length and learning-rate schedule.
    num_queries: `NUM_OBJECT_QUERIES`.
    resnet_norm: "frozen_bn" (detectron2's default) or "bn" (SyncBN: Cityscapes).
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
  build = config_lib.mp_former_config if variant == "mp_former" else config_lib.model_config
  model = build(num_classes=dataset.num_classes, backbone=backbone)
  model.decoder.num_queries = num_queries
  if backbone.startswith("resnet"):
    model.backbone.resnet.norm = resnet_norm
  config = config_lib.base_config(model, dataset)
  optimizer = config.optimizer
  optimizer.schedule = schedule.kind
  optimizer.decay_steps = tuple(schedule.decay_steps)
  optimizer.decay_factor = 0.1  # detectron2's SOLVER.GAMMA
  optimizer.warmup_steps = schedule.warmup_steps
  optimizer.warmup_factor = 1.0
  config.training.total_steps = schedule.total_steps
  # Not a reference setting, an exact shortcut: batches whose images hold at most 32 (64)
  # segments run with 32 (64) GT slots instead of `max_gt`, as the reference sizes its mask
  # pilot block by the batch's largest count (mpformer_jax/training/slot_buckets.py).
  config.training.gt_slot_buckets = tuple(b for b in (32, 64) if b < dataset.max_gt)
  return config
