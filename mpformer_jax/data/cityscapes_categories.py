"""The 19 Cityscapes training classes (no TFDS import: `metadata` loads this on its own).

Ids are Cityscapes labelIds (the values of `*_gtFine_labelIds.png`, and `instanceIds // 1000`),
as in cityscapesscripts' `labels.py`. The table is ordered by trainId 0..18, the reference's
label order (detectron2's `CITYSCAPES_CATEGORIES`); the 8 classes with instances are things, and
the instance task labels them in this order too (person 0 ... bicycle 7). Every other labelId
(trainId 255: unlabeled, ego vehicle, ..., caravan, trailer) is void.
"""

from __future__ import annotations

CATEGORIES = (
  {"id": 7, "name": "road", "isthing": False},
  {"id": 8, "name": "sidewalk", "isthing": False},
  {"id": 11, "name": "building", "isthing": False},
  {"id": 12, "name": "wall", "isthing": False},
  {"id": 13, "name": "fence", "isthing": False},
  {"id": 17, "name": "pole", "isthing": False},
  {"id": 19, "name": "traffic light", "isthing": False},
  {"id": 20, "name": "traffic sign", "isthing": False},
  {"id": 21, "name": "vegetation", "isthing": False},
  {"id": 22, "name": "terrain", "isthing": False},
  {"id": 23, "name": "sky", "isthing": False},
  {"id": 24, "name": "person", "isthing": True},
  {"id": 25, "name": "rider", "isthing": True},
  {"id": 26, "name": "car", "isthing": True},
  {"id": 27, "name": "truck", "isthing": True},
  {"id": 28, "name": "bus", "isthing": True},
  {"id": 31, "name": "train", "isthing": True},
  {"id": 32, "name": "motorcycle", "isthing": True},
  {"id": 33, "name": "bicycle", "isthing": True},
)

# labels.py defines labelIds 0..33, plus -1 for "license plate" (never drawn into the label PNGs).
MAX_LABEL_ID = 33
