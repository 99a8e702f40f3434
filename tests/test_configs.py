"""The run configurations in `configs/`: every one loads, and the paper's numbers are right."""

from __future__ import annotations

import importlib
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import paper
from mpformer_jax import models
from mpformer_jax.data import pipeline
from mpformer_jax.data.config import default_dataset_config, validate_dataset_config
from mpformer_jax.training import trainer

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CONFIG_NAMES = sorted(
  p.stem for p in CONFIG_DIR.glob("*.py") if p.name not in ("__init__.py", "paper.py")
)
# Options of the configs that are not paper configs (those list theirs in `SCHEDULES`).
OTHER_ARGS = {"synthetic": ("mp_former", "mask2former")}

COCO = {
  "12ep": (88_500, "step", (73_750, 81_125)),
  "24ep": (177_000, "step", (162_250, 169_625)),
  "36ep": (265_500, "step", (245_000, 260_000)),
  "50ep": (368_750, "step", (327_778, 355_092)),
}
SWIN_COCO = {"100ep": (737_500, "step", (655_556, 710_184))}
ADE20K = {"poly": (160_000, "poly", ()), "steplr": (160_000, "step", (135_000, 150_000))}
CITYSCAPES = {"poly": (90_000, "poly", ()), "steplr": (90_000, "step", (80_000, 85_000))}

# name: backbone, queries, classes, crop, schedules {option: (steps, kind, decay steps)},
# default schedule, MP groups and point-noise scale (spec 1.1 and 4).
PAPER = {
  "coco_panoptic_r50": ("resnet50", 100, 133, (1024, 1024), COCO, "50ep", 5, 0.2),
  "coco_instance_r50": ("resnet50", 100, 80, (1024, 1024), COCO, "50ep", 1, 0.0),
  "coco_panoptic_swin_l": ("swin_large", 200, 133, (1024, 1024), SWIN_COCO, "100ep", 5, 0.2),
  "coco_instance_swin_l": (
    "swin_large",
    200,
    80,
    (1024, 1024),
    {
      **SWIN_COCO,
      "drop": (250_000, "step", (145_000, 175_000)),
      "drop169999": (250_000, "step", (170_000, 200_000)),
      "drop269999": (350_000, "step", (270_000, 300_000)),
      "drop394999": (450_000, "step", (395_000, 425_000)),
    },
    "100ep",
    1,
    0.0,
  ),
  "ade20k_semantic_r50": ("resnet50", 100, 150, (512, 512), ADE20K, "poly", 1, 0.0),
  "ade20k_semantic_swin_l": ("swin_large", 100, 150, (640, 640), ADE20K, "poly", 1, 0.0),
  "ade20k_panoptic_r50": ("resnet50", 100, 150, (640, 640), ADE20K, "poly", 1, 0.0),
  "ade20k_instance_r50": ("resnet50", 100, 100, (640, 640), ADE20K, "poly", 1, 0.0),
  "cityscapes_semantic_r50": (
    "resnet50",
    100,
    19,
    (512, 1024),
    {**CITYSCAPES, "150k_steplr": (150_000, "step", (80_000, 85_000))},
    "poly",
    1,
    0.0,
  ),
  "cityscapes_instance_r50": ("resnet50", 100, 8, (512, 1024), CITYSCAPES, "poly", 1, 0.0),
  "cityscapes_panoptic_r50": ("resnet50", 100, 19, (512, 1024), CITYSCAPES, "poly", 1, 0.0),
}


def _module(name: str):
  return importlib.import_module(f"configs.{name}")


def _arg_lists(name: str) -> list[tuple[str, ...]]:
  """Every valid way to call `get_config`: no argument, then each option string."""
  module = _module(name)
  if not hasattr(module, "SCHEDULES"):
    return [()] + [(a,) for a in OTHER_ARGS.get(name, ())]
  args = []
  for variant, schedule in itertools.product(("", *paper.VARIANTS), ("", *module.SCHEDULES)):
    args.append(",".join(o for o in (variant, schedule) if o))
    if variant and schedule:
      args.append(f"{schedule}, {variant}")  # any order, spaces allowed
  return [()] + [(a,) for a in args]


def test_the_table_covers_every_paper_config():
  paper_names = {n for n in CONFIG_NAMES if hasattr(_module(n), "SCHEDULES")}
  assert paper_names == set(PAPER)
  for name, row in PAPER.items():
    assert set(_module(name).SCHEDULES) == set(row[4]), name


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_loads_with_every_option(name):
  for args in _arg_lists(name):
    config = _module(name).get_config(*args)
    validate_dataset_config(config.dataset)
    trainer.validate_config(config)  # 8 devices, batch, groups, class counts
    assert config.model.num_classes == config.dataset.num_classes, (name, args)


def _parse(arg: str) -> tuple[str, str | None]:
  options = [o.strip() for o in arg.split(",") if o.strip()]
  variant = next((o for o in options if o in paper.VARIANTS), "mp_former")
  schedule = next((o for o in options if o not in paper.VARIANTS), None)
  return variant, schedule


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_numbers(name):
  backbone, queries, classes, crop, schedules, default, groups, noise = PAPER[name]
  for (arg,) in _arg_lists(name)[1:] + [("",)]:
    config = _module(name).get_config(arg)
    variant, schedule = _parse(arg)
    steps, kind, decay = schedules[schedule or default]
    assert config.training.total_steps == steps, (name, arg)
    assert config.optimizer.schedule == kind
    assert tuple(config.optimizer.decay_steps) == decay
    assert config.optimizer.decay_factor == 0.1 and config.optimizer.poly_power == 0.9
    # Every warmup in these configs is a no-op (factor 1.0), kept for fidelity.
    assert config.optimizer.warmup_factor == 1.0
    assert config.optimizer.warmup_steps == (10 if kind == "step" else 0)
    assert config.model.decoder.num_queries == queries
    assert config.model.num_classes == config.dataset.num_classes == classes
    assert tuple(config.dataset.crop_size) == crop
    mp = variant == "mp_former"
    assert config.model.mask_pilot.enabled is mp
    assert config.model.decoder.query_pos_embed is not mp
    if mp:
      pilot = config.model.mask_pilot
      assert (pilot.groups, pilot.noise_scale) == (groups, noise)
      assert pilot.label_noise_ratio == 0.2 and pilot.all_layers is True
    # The reference's settings for every task (spec sections 3 and 4).
    assert config.optimizer.clip_norm == 0.01
    assert config.optimizer.learning_rate == 1e-4
    assert config.optimizer.weight_decay == 0.05
    assert config.optimizer.backbone_multiplier == 0.1
    assert config.training.global_batch_size == 16
    assert config.loss.num_points == 12544
    assert config.model.decoder.num_layers == 9
    assert config.loss.group_size == config.model.mask_pilot.group_size == 4
  if backbone == "resnet50":
    assert config.model.backbone.name == "resnet"
    assert tuple(config.model.backbone.resnet.depths) == (3, 4, 6, 3)
    # detectron2's FrozenBN, except Cityscapes' SyncBN (spec 2.1).
    norm = "bn" if name.startswith("cityscapes") else "frozen_bn"
    assert config.model.backbone.resnet.norm == norm
  else:
    swin = config.model.backbone.swin
    assert config.model.backbone.name == "swin"
    assert (swin.embed_dim, tuple(swin.depths), swin.window_size) == (192, (2, 2, 18, 2), 12)
    assert tuple(swin.num_heads) == (6, 12, 24, 48) and swin.drop_path_rate == 0.3


def test_datasets():
  coco = _module("coco_panoptic_r50").get_config().dataset
  assert (coco.name, coco.task, coco.augmentation) == ("coco_panoptic", "panoptic", "lsj")
  assert (coco.min_scale, coco.max_scale) == (0.1, 2.0)
  assert (coco.eval_short_side, coco.eval_max_size, tuple(coco.eval_size)) == (
    800,
    1333,
    (1344, 1344),
  )
  instance = _module("coco_instance_r50").get_config().dataset
  assert (instance.name, instance.task) == ("coco_instance", "instance")

  ade = _module("ade20k_semantic_r50").get_config().dataset
  assert (ade.name, ade.task, ade.augmentation) == ("ade20k_semantic", "semantic", "short_side")
  assert ade.short_side.sizes == (256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819,
                                  870, 921, 972, 1024)  # fmt: skip
  assert (ade.short_side.max_size, ade.eval_short_side, ade.eval_max_size) == (2048, 512, 2048)
  assert ade.short_side.color_jitter and ade.short_side.single_category_max_area == 1.0
  ade_l = _module("ade20k_semantic_swin_l").get_config().dataset
  assert (ade_l.short_side.sizes[0], ade_l.short_side.sizes[-1]) == (320, 1280)
  assert (ade_l.short_side.max_size, ade_l.eval_short_side, ade_l.eval_max_size) == (
    2560,
    640,
    2560,
  )
  # Panoptic and instance: one panoptic dataset, 640 crops with either backbone (spec 4).
  for task, classes in (("panoptic", 150), ("instance", 100)):
    pan = _module(f"ade20k_{task}_r50").get_config().dataset
    assert (pan.name, pan.task, pan.num_classes) == ("ade20k_panoptic", task, classes)
    assert pan.augmentation == "short_side" and pan.max_gt == 128
    assert pan.short_side.sizes == (320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960,
                                    1024, 1088, 1152, 1216, 1280)  # fmt: skip
    assert pan.short_side.color_jitter and pan.short_side.single_category_max_area == 1.0
    assert (pan.short_side.max_size, pan.eval_short_side, pan.eval_max_size) == (2560, 640, 2560)
    assert tuple(pan.eval_size) == (2560, 2560) and pan.flip
  with pytest.raises(ValueError, match="task: expected semantic, panoptic or instance"):
    paper.ade20k_dataset("resnet50", task="depth")

  for task, classes in (("semantic", 19), ("instance", 8), ("panoptic", 19)):
    city = _module(f"cityscapes_{task}_r50").get_config().dataset
    assert (city.name, city.task, city.num_classes) == ("cityscapes", task, classes)
    assert (city.short_side.sizes[0], city.short_side.sizes[-1]) == (512, 2048)
    assert (city.short_side.max_size, city.eval_short_side, city.eval_max_size) == (
      4096,
      1024,
      2048,
    )
    assert tuple(city.eval_size) == (1024, 2048)


def test_unknown_and_conflicting_options_raise():
  get = _module("coco_panoptic_r50").get_config
  with pytest.raises(ValueError, match=r"configs/coco_panoptic_r50\.py: unknown option 'bogus'"):
    get("mask2former,bogus")
  with pytest.raises(ValueError, match=r"configs/coco_panoptic_r50\.py: option 'mp_former'"):
    get("mask2former,mp_former")
  with pytest.raises(ValueError, match=r"option '12ep': the schedule is already '50ep'"):
    get("50ep,12ep")
  with pytest.raises(ValueError, match=r"configs/ade20k_semantic_r50\.py: unknown option '12ep'"):
    _module("ade20k_semantic_r50").get_config("12ep")
  with pytest.raises(ValueError, match=r"configs/coco_panoptic_swin_l\.py: unknown option '50ep'"):
    _module("coco_panoptic_swin_l").get_config("50ep")


# ml_collections loads config files with the deprecated `load_module()`.
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_loading_through_the_config_flag():
  # main.py's flag, on a private FlagValues; `sys_argv` is where the override flags are found.
  argv = [
    "main.py",
    f"--config={CONFIG_DIR / 'coco_panoptic_r50.py'}:mask2former,12ep",
    "--config.training.total_steps=123",
    "--config.dataset.max_gt=64",
  ]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "Configuration file.", flag_values=flag_values, sys_argv=argv
  )
  flag_values(argv)
  config = flag_values.config
  assert config.training.total_steps == 123 and config.dataset.max_gt == 64
  assert config.optimizer.decay_steps == (73_750, 81_125)
  assert not config.model.mask_pilot.enabled


def _num_params(config) -> tuple[int, dict[str, int]]:
  """Parameters of the network of `config`, in total and per top-level module.

  Only the `params` collection counts: frozen BN's statistics and affine terms live in
  `batch_stats`, as detectron2's FrozenBatchNorm2d keeps them in buffers, not parameters.
  """
  model = models.build_model(config.model)
  variables = jax.eval_shape(
    lambda rng: model.init(rng, jnp.zeros((1, 64, 64, 3))), jax.random.key(0)
  )
  sizes = {
    k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v))
    for k, v in variables["params"].items()
  }
  return sum(sizes.values()), sizes


@pytest.mark.parametrize(
  ("name", "published"),
  # Mask2Former's model zoo: R50 panoptic 44M, Swin-L (200 queries) panoptic 216M parameters.
  [("coco_panoptic_r50", 44e6), ("coco_panoptic_swin_l", 216e6)],
)
def test_parameter_counts(name, published):
  m2f_config = _module(name).get_config("mask2former")
  mp_config = _module(name).get_config("mp_former")
  m2f, _ = _num_params(m2f_config)
  mp, mp_parts = _num_params(mp_config)
  assert abs(m2f - published) / published < 0.01, m2f
  # MP-Former adds the label embedding (`label_enc`, K x 256) and drops `query_embed` (Q x 256).
  hidden = mp_config.model.decoder.hidden_dim
  classes, queries = mp_config.model.num_classes, mp_config.model.decoder.num_queries
  assert mp_parts["mask_pilot"] == classes * hidden
  assert mp - m2f == (classes - queries) * hidden


def test_dataset_options_are_validated():
  def check(match, **changes):
    config = default_dataset_config()
    for key, value in changes.items():
      target = config
      *parents, leaf = key.split("__")
      for parent in parents:
        target = getattr(target, parent)
      setattr(target, leaf, value)
    with pytest.raises(ValueError, match=match):
      validate_dataset_config(config)

  check("dataset.augmentation", augmentation="random")
  check("dataset.short_side.sizes", augmentation="short_side")  # empty by default
  check(
    "dataset.short_side.max_size",
    augmentation="short_side",
    short_side__sizes=(256, 512),
    short_side__max_size=300,
  )
  check(
    "dataset.short_side.single_category_max_area",
    augmentation="short_side",
    short_side__sizes=(256,),
    short_side__max_size=1024,
    short_side__single_category_max_area=0.0,
  )
  check("dataset.eval_max_size", eval_short_side=128, eval_max_size=64)
  check("dataset.eval_size", eval_short_side=256, eval_max_size=512)  # canvas is 128 x 128
  check("dataset.eval_short_side", eval_short_side=-1)


def test_synthetic_defaults_are_unchanged():
  config = default_dataset_config()
  assert config.augmentation == "lsj" and config.eval_short_side == 0
  assert tuple(config.crop_size) == tuple(config.eval_size) == (128, 128)
  assert (config.min_scale, config.max_scale, config.flip, config.max_gt) == (0.5, 2.0, True, 16)


def test_loaders_of_paper_configs_name_the_missing_dataset_and_how_to_prepare_it(tmp_path):
  # The paper configs' augmentation and test resize are implemented: the loaders get as far as
  # opening the dataset, and say how to prepare it when it is missing.
  for name, make in (
    ("ade20k_semantic", lambda d: pipeline.create_train_loader(d, 16, 0, 0, 1)),
    ("ade20k_panoptic", lambda d: pipeline.create_train_loader(d, 16, 0, 0, 1)),
    ("coco_panoptic", lambda d: pipeline.create_eval_loader(d, 16, 0, 1)),
  ):
    dataset = _module(f"{name}_r50").get_config().dataset
    dataset.data_dir = str(tmp_path)
    with pytest.raises(ValueError, match=f"{name}.*not prepared.*mpformer_jax.data.prepare"):
      make(dataset)
