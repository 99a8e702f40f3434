"""Input data: the synthetic panoptic dataset, targets, augmentation and grain pipelines.

Modules (import the ones you need; only `pipeline`, `sources` and `synthetic_builder` pull in
TFDS/grain, and nothing outside this package imports it):

- `config`: `default_dataset_config()` and its validation;
- `metadata`: categories and the contiguous label space of each task;
- `synthetic_shapes`: the procedural scene generator (numpy);
- `synthetic_builder`: its TFDS builder (`synthetic_shapes`) and `ensure_built`;
- `panoptic_png`: COCO's RGB encoding of panoptic ids;
- `targets`: panoptic annotations -> fixed-shape training targets;
- `transforms`: augmentation and normalisation;
- `sources`: TFDS data sources of the configured dataset;
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
