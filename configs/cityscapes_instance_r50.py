"""Cityscapes instance segmentation (8 classes), ResNet-50 with SyncBN: MP-Former or M2F.

Usage (`arg`: comma-separated options, each optional):
  python main.py --config configs/cityscapes_instance_r50.py --workdir DIR       # MP-Former, poly
  python main.py --config configs/cityscapes_instance_r50.py:mask2former,steplr --workdir DIR

Options:
  variant: `mp_former` (default) or `mask2former`.
  schedule: `poly` (default, [M2F]'s) or `steplr` ([MP]'s). [inference] The paper may report
    MP-Former's Cityscapes numbers with either schedule (spec section 4).

Sources ([M2F] Mask2Former, [MP] MP-Former; reference spec sections 1.1, 2.1, 3, 4, 6):
- network: [M2F] configs/cityscapes/instance-segmentation/maskformer2_R50_bs16_90k.yaml: 100
  queries, 8 (thing) classes, ResNet-50 with SyncBN (Base-Cityscapes-InstanceSegmentation.yaml
  :14, spec 2.1; here `model.backbone.resnet.norm = "bn"`);
- schedule: poly = [M2F] Base-Cityscapes-InstanceSegmentation.yaml (90k iterations, power
  0.9, no warmup); steplr = [MP] configs/cityscapes/instance-segmentation/maskformer2_R50_
  bs16_90k_steplr.yaml (90k, step x0.1 at 80000 and 85000, a no-op 10-step warmup at factor
  1.0);
- data (spec 4): short side in {512, 614, ..., 2048} (int(x * 0.1 * 1024), x = 5..20), max
  4096, 512 x 1024 crop (single-category max area 1.0), ColorAugSSD, flip; test short 1024 /
  max 2048, i.e. the 1024 x 2048 images as they are; `max_gt` 128 ([inference], see
  `configs/paper.py`); the short-side augmentation lands with the real datasets;
- mask pilot: the released scripts' settings (spec 1.1: 1 group, point noise 0.0, label noise
  0.2, all layers; `config_lib`'s defaults). [inference] The scripts train COCO instance; we
  assume the Cityscapes runs used the same overrides;
- everything else (optimizer, losses, batch 16): `configs/paper.py`.
"""

from __future__ import annotations

import ml_collections

from configs import paper

FILE = "configs/cityscapes_instance_r50.py"
SCHEDULES = paper.CITYSCAPES_SCHEDULES
DEFAULT_SCHEDULE = "poly"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variant, schedule = paper.parse_options(arg, FILE, SCHEDULES, DEFAULT_SCHEDULE)
  return paper.paper_config(
    paper.cityscapes_dataset("instance"),
    "resnet50",
    variant,
    SCHEDULES[schedule],
    num_queries=100,
    resnet_norm="bn",
  )
