"""COCO panoptic segmentation (133 classes), ResNet-50: MP-Former or its Mask2Former baseline.

Usage (`arg`: comma-separated options, each optional):
  python main.py --config configs/coco_panoptic_r50.py --workdir DIR             # MP-Former, 50ep
  python main.py --config configs/coco_panoptic_r50.py:mask2former,12ep --workdir DIR

Options:
  variant: `mp_former` (default) or `mask2former`.
  schedule: `50ep` (default), `12ep`, `24ep` or `36ep`.

Sources ([M2F] Mask2Former, [MP] MP-Former; reference spec sections 1.1, 2.1, 3, 4):
- network: [M2F] configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml: 100
  queries, FrozenBN ResNet-50 (spec 2.1), 133 classes;
- schedule: 50ep = [M2F] Base-COCO-PanopticSegmentation.yaml (368,750 iterations, step
  x0.1 at 327778 and 355092); 12ep / 36ep = [MP] configs/coco/panoptic-segmentation/
  maskformer2_R50_bs16_{12,36}ep.yaml (88,500 at 73750 / 81125; 265,500 at 245000 / 260000);
  24ep = [MP]'s instance 24ep_DN_query.yaml (177,000 at 162250 / 169625), as [MP] ships no
  panoptic 24ep;
- data: LSJ (scale 0.1-2.0, 1024 crop, flip), test resize short 800 / max 1333 (spec 4);
  `configs/paper.py` documents `max_gt`, `eval_size` and `eval_max_segments` ([inference]);
- mask pilot: [MP]'s panoptic yamls have no `MODEL.DN` block, so, as the spec says (section 4),
  `mask2former/config.py`'s defaults apply: `NUM_DN` 5 groups, `NOISE_SCALE` 0.2 (point noise
  on). The rest are the released script's: label-flip noise 0.2, all layers. [inference] Both
  released scripts pass `NUM_DN 1` / `NOISE_SCALE 0.0` on the command line and train COCO
  instance (spec 1.1); a panoptic run launched the same way would get 1 / 0.0:
  `--config.model.mask_pilot.groups=1 --config.model.mask_pilot.noise_scale=0.0`.
- everything else (optimizer, losses, batch 16): `configs/paper.py`.
"""

from __future__ import annotations

import ml_collections

from configs import paper

FILE = "configs/coco_panoptic_r50.py"
SCHEDULES = paper.COCO_SCHEDULES
DEFAULT_SCHEDULE = "50ep"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variant, schedule = paper.parse_options(arg, FILE, SCHEDULES, DEFAULT_SCHEDULE)
  config = paper.paper_config(
    paper.coco_dataset("panoptic"), "resnet50", variant, SCHEDULES[schedule], num_queries=100
  )
  if variant == "mp_former":
    config.model.mask_pilot.groups = 5
    config.model.mask_pilot.noise_scale = 0.2
  return config
