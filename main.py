"""Entry point: `python main.py --config configs/<name>.py --workdir DIR [--mode train|eval]`.

Training and evaluation arrive with the training issue; today this validates and prints the
configuration and builds the network once.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/default.py", "Configuration file.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to run.")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from mpformer_jax import models

  config = FLAGS.config
  logging.info("Config:\n%s", config)
  model = models.build_model(config)
  images = jnp.zeros((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)
  count = sum(x.size for x in jax.tree.leaves(shapes["params"]))
  print(f"Built {config.model.backbone.name} model with {count / 1e6:.1f}M parameters.")
  print(f"--mode={FLAGS.mode} is not implemented yet (see the training issue).")


if __name__ == "__main__":
  app.run(main)
