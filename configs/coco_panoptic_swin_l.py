"""COCO panoptic segmentation (133 classes), Swin-L (IN-21k, 384): MP-Former or Mask2Former.

Usage (`arg`: comma-separated options, each optional):
  python main.py --config configs/coco_panoptic_swin_l.py --workdir DIR          # MP-Former
  python main.py --config configs/coco_panoptic_swin_l.py:mask2former --workdir DIR

Options:
  variant: `mp_former` (default) or `mask2former`.
  schedule: `100ep` (default, the only one).

Sources ([M2F] Mask2Former, [MP] MP-Former; reference spec sections 2.1, 3, 4):
- network: [M2F] configs/coco/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_
  bs16_100ep.yaml: 200 queries; Swin-L embed 192, depths 2/2/18/2, heads 6/12/24/48, window
  12, drop path 0.3, pretrain size 384 (spec 2.1);
- schedule: 100ep = 737,500 iterations, step x0.1 at 655556 and 710184 (spec 4);
- data: LSJ (scale 0.1-2.0, 1024 crop, flip), test resize short 800 / max 1333 (spec 4);
  `configs/paper.py` documents `max_gt`, `eval_size` and `eval_max_segments` ([inference]);
- mask pilot: [inference] as `configs/coco_panoptic_r50.py` (no `MODEL.DN` block in [MP]'s
  panoptic yamls, so `NUM_DN` 5 / `NOISE_SCALE` 0.2); [MP] ships no Swin-L panoptic config;
- everything else (optimizer, losses, batch 16): `configs/paper.py`.
"""

from __future__ import annotations

import ml_collections

from configs import paper

FILE = "configs/coco_panoptic_swin_l.py"
SCHEDULES = paper.COCO_SWIN_SCHEDULES
DEFAULT_SCHEDULE = "100ep"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variant, schedule = paper.parse_options(arg, FILE, SCHEDULES, DEFAULT_SCHEDULE)
  config = paper.paper_config(
    paper.coco_dataset("panoptic"), "swin_large", variant, SCHEDULES[schedule], num_queries=200
  )
  if variant == "mp_former":
    config.model.mask_pilot.groups = 5
    config.model.mask_pilot.noise_scale = 0.2
  return config
