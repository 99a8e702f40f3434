"""COCO instance segmentation (80 classes), Swin-L (IN-21k, 384): MP-Former or Mask2Former.

Usage (`arg`: comma-separated options, each optional):
  python main.py --config configs/coco_instance_swin_l.py --workdir DIR          # MP-Former
  python main.py --config configs/coco_instance_swin_l.py:mask2former --workdir DIR
  python main.py --config configs/coco_instance_swin_l.py:drop169999 --workdir DIR

Options:
  variant: `mp_former` (default) or `mask2former`.
  schedule: `100ep` (default), `drop`, `drop169999`, `drop269999` or `drop394999`.

Sources ([M2F] Mask2Former, [MP] MP-Former; reference spec sections 1.1, 2.1, 3, 4):
- network: [M2F] configs/coco/instance-segmentation/swin/maskformer2_swin_large_IN21k_384_
  bs16_100ep.yaml: 200 queries; Swin-L embed 192, depths 2/2/18/2, heads 6/12/24/48, window
  12, drop path 0.3, pretrain size 384 (spec 2.1);
- schedule: 100ep = 737,500 iterations, step x0.1 at 655556 and 710184 (spec 4). The `drop*`
  options are [MP]'s configs/coco/instance-segmentation/swin/maskformer2_swin_large_IN21k_384_
  bs16_100ep_drop*.yaml (spec 4): `drop` 250k at 145k / 175k, `drop169999` 250k at 170k /
  200k, `drop269999` 350k at 270k / 300k, `drop394999` 450k at 395k / 425k;
- data: LSJ (scale 0.1-2.0, 1024 crop, flip), test resize short 800 / max 1333 (spec 4);
  `configs/paper.py` documents `max_gt`, `eval_size` and `eval_max_segments` ([inference]);
- mask pilot: the released scripts' settings (spec 1.1: 1 group, point noise 0.0, label noise
  0.2, all layers; `config_lib`'s defaults). [inference] The scripts launch the R50 config;
  we assume the Swin-L runs used the same overrides;
- everything else (optimizer, losses, batch 16): `configs/paper.py`.
"""

from __future__ import annotations

import ml_collections

from configs import paper

FILE = "configs/coco_instance_swin_l.py"
SCHEDULES = paper.COCO_SWIN_INSTANCE_SCHEDULES
DEFAULT_SCHEDULE = "100ep"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variant, schedule = paper.parse_options(arg, FILE, SCHEDULES, DEFAULT_SCHEDULE)
  return paper.paper_config(
    paper.coco_dataset("instance"), "swin_large", variant, SCHEDULES[schedule], num_queries=200
  )
