"""Shared test utilities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mpformer_jax import config_lib


def tiny_model_config(num_classes: int = 5, backbone: str = "resnet", num_layers: int = 3):
  """A small network that compiles and runs in seconds on a CPU."""
  config = config_lib.model_config(num_classes=num_classes)
  if backbone == "resnet":
    config.backbone.resnet.depths = (1, 1, 1, 1)
    config.backbone.resnet.stem_width = 16
    config.backbone.resnet.width = 8
  else:
    config.backbone = config_lib.swin_config("tiny", drop_path_rate=0.0)
    s = config.backbone.swin
    s.embed_dim, s.depths, s.num_heads, s.window_size = 16, (1, 1, 1, 1), (1, 2, 2, 4), 2
  pd = config.pixel_decoder
  pd.conv_dim, pd.mask_dim, pd.num_layers, pd.num_heads, pd.ffn_dim = 32, 32, 1, 2, 64
  dec = config.decoder
  dec.hidden_dim, dec.num_queries, dec.num_heads, dec.ffn_dim = 32, 6, 2, 64
  dec.num_layers = num_layers
  return config


def random_variables(model, image_shape, seed: int = 0, scale: float = 0.1):
  """Random variables with the model's structure, without compiling `model.init`.

  XLA:CPU compiles every random initialiser separately, which costs tens of seconds for a whole
  network; tests that only need *some* weights fill the `eval_shape` structure with numpy.
  Norm scales and variances get 1 so that activations stay in a sane range.
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
