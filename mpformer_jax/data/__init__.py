"""Input data: synthetic and real panoptic datasets, targets, augmentation and grain pipelines.

Modules (import the ones you need; only `pipeline`, `sources`, `tfds_sources`, `prepare`,
`raw_io` and the `*_builder` modules pull in TFDS/grain, and nothing outside this package
imports it):

- `config`: `default_dataset_config()` and its validation;
- `metadata`: categories and the contiguous label space of each task (`*_categories` hold the
  real datasets' tables);
- `synthetic_shapes`: the procedural scene generator (numpy);
- `synthetic_builder`: its TFDS builder (`synthetic_shapes`) and `ensure_built`;
- `coco_builder`, `ade20k_builder`, `cityscapes_builder`: TFDS builders of the real datasets
  (`coco_panoptic`, `coco_instance`, `ade20k_semantic`, `ade20k_panoptic`, `cityscapes`) from
  their raw files;
- `raw_io`: what those share: bad-data errors, image readers, the build report, `RawBuilder`;
- `prepare`: `prepare(name, manual_dir, data_dir, skip_bad)` and its command line
  (`python -m mpformer_jax.data.prepare --dataset NAME --manual_dir RAW --data_dir OUT`);
- `panoptic_png`: COCO's RGB encoding of panoptic ids;
- `targets`: panoptic annotations -> fixed-shape training targets;
- `transforms`: augmentation and normalisation;
- `sources`: TFDS data sources of the configured dataset;
- `tfds_sources`: adapters that read TFDS' own prepared `coco/2017_panoptic` and
  `scene_parse150` in our layout;
- `pipeline`: `create_train_loader`, `create_eval_loader`, `global_batch`.
"""

from mpformer_jax.data.config import default_dataset_config, validate_dataset_config
from mpformer_jax.data.metadata import DatasetMetadata, dataset_metadata

__all__ = [
  "DatasetMetadata",
  "dataset_metadata",
  "default_dataset_config",
  "validate_dataset_config",
]
