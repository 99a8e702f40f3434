"""COCO instance segmentation (80 classes), ResNet-50: MP-Former or its Mask2Former baseline.

Usage (`arg`: comma-separated options, each optional):
  python main.py --config configs/coco_instance_r50.py --workdir DIR             # MP-Former, 50ep
  python main.py --config configs/coco_instance_r50.py:12ep --workdir DIR        # released model
  python main.py --config configs/coco_instance_r50.py:mask2former --workdir DIR

Options:
  variant: `mp_former` (default) or `mask2former`.
  schedule: `50ep` (default), `12ep`, `24ep` or `36ep`.

Sources ([M2F] Mask2Former, [MP] MP-Former; reference spec sections 1.1, 2.1, 3, 4, 6):
- network: [M2F] configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml: 100
  queries, FrozenBN ResNet-50 (spec 2.1), 80 classes;
- schedule: 50ep = [M2F] Base-COCO-InstanceSegmentation.yaml:19-41 (368,750 iterations, step
  x0.1 at 327778 and 355092); 12ep / 24ep / 36ep = [MP] configs/coco/instance-segmentation/
  maskformer2_R50_bs16_{12,24,36}ep_DN_query.yaml (88,500 at 73750 / 81125; 177,000 at
  162250 / 169625; 265,500 at 245000 / 260000). [MP]'s released checkpoint is the 12ep model
  (README: AP 40.15, Table 7's last row; spec 6);
- data: LSJ (scale 0.1-2.0, 1024 crop, flip), test resize short 800 / max 1333 (spec 4);
  `configs/paper.py` documents `max_gt`, `eval_size` and `eval_max_segments` ([inference]);
- mask pilot: the released training scripts, which train exactly this task
  ([MP] run_50ep_no_noise_all_ly.sh lines 9-23, spec 1.1): 1 group, point-noise scale 0.0,
  label-flip noise 0.2, all layers (`config_lib`'s defaults). The `_DN_query.yaml` files say 5 /
  0.2, but the scripts override them;
- everything else (optimizer, losses, batch 16): `configs/paper.py`.
"""

from __future__ import annotations

import ml_collections

from configs import paper

FILE = "configs/coco_instance_r50.py"
SCHEDULES = paper.COCO_SCHEDULES
DEFAULT_SCHEDULE = "50ep"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variant, schedule = paper.parse_options(arg, FILE, SCHEDULES, DEFAULT_SCHEDULE)
  return paper.paper_config(
    paper.coco_dataset("instance"), "resnet50", variant, SCHEDULES[schedule], num_queries=100
  )
