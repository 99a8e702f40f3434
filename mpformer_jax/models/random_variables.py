"""Random weights with a model's structure, without compiling `model.init`.

XLA:CPU compiles every random initialiser separately, which costs tens of seconds for a whole
network; tests and benchmarks that only need *some* weights fill the `eval_shape` structure
with numpy instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, image_shape, seed: int = 0, scale: float = 0.1):
  """Variables of `model` for `[1, *image_shape, 3]` images, drawn with numpy.

  Norm scales and variances get 1 and means 0, so that activations stay in a sane range; every
  other leaf is `scale` times a standard normal.
  """
  rng = np.random.default_rng(seed)
  x = jax.ShapeDtypeStruct((1, *image_shape, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith(("['scale']", "['var']")):
      return np.ones(leaf.shape, np.float32)
    if name.endswith("['mean']"):
      return np.zeros(leaf.shape, np.float32)
    return (scale * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)
