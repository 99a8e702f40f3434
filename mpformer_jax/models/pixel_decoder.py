"""Mask2Former's multi-scale deformable-attention pixel decoder (`MSDeformAttnPixelDecoder`).

Backbone features res3..res5 are projected to `conv_dim` channels, flattened, and refined by a
stack of deformable-attention encoder layers; res2 is merged back in FPN style to give the
stride-4 `mask_features` (spec section 2.2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mpformer_jax.models import layers
from mpformer_jax.models.conv import Conv2D
from mpformer_jax.models.position_encoding import sine_position_encoding
from mpformer_jax.ops import msda
from mpformer_jax.ops.sampling import resize_bilinear

Dtype = Any

# Backbone feature names from high to low resolution.
FEATURE_NAMES = ("res2", "res3", "res4", "res5")


def _sampling_offset_bias(num_heads: int, num_levels: int, num_points: int):
  """The reference's offset bias: head h points along angle 2*pi*h/heads, point p at (p + 1)x."""

  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = np.arange(num_heads, dtype=np.float32) * (2.0 * math.pi / num_heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, num_levels, num_points, 1))
    grid = grid * np.arange(1, num_points + 1, dtype=np.float32)[None, None, :, None]
    return jnp.asarray(grid.reshape(shape), dtype)

  return init


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention layer (Deformable DETR), queries attend to `value`.

  Attributes:
    num_heads: attention heads.
    num_levels: feature levels in `value`.
    num_points: sampling points per head and level.
    implementation: MSDA op implementation (see `mpformer_jax.ops.msda`).
    dtype: compute dtype.
    interpret: run a Pallas MSDA kernel in interpret mode (tests on CPU).
  """

  num_heads: int = 8
  num_levels: int = 3
  num_points: int = 4
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  interpret: bool = False

  @nn.compact
  def __call__(
    self,
    query: jax.Array,
    reference_points: jax.Array,
    value: jax.Array,
    spatial_shapes: Sequence[tuple[int, int]],
  ) -> jax.Array:
    """Deformable attention.

    Args:
      query: `[B, Q, D]`, positional embedding already added.
      reference_points: `[Q, 2]` normalised (x, y), shared by batch and levels (the encoder has
        no padding, so the reference's valid ratios are all 1).
      value: `[B, S, D]`, the flattened levels, `S = sum(H_l * W_l)`.
      spatial_shapes: static `(H_l, W_l)` per level.

    Returns:
      `[B, Q, D]`.
    """
    b, q, d = query.shape
    h, lv, p = self.num_heads, self.num_levels, self.num_points
    value = nn.Dense(
      d,
      dtype=self.dtype,
      kernel_init=layers.xavier_uniform,
      bias_init=nn.initializers.zeros,
      name="value_proj",
    )(value).reshape(b, value.shape[1], h, d // h)
    offsets = nn.Dense(
      h * lv * p * 2,
      dtype=self.dtype,
      kernel_init=nn.initializers.zeros,
      bias_init=_sampling_offset_bias(h, lv, p),
      name="sampling_offsets",
    )(query).reshape(b, q, h, lv, p, 2)
    weights = nn.Dense(
      h * lv * p,
      dtype=self.dtype,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.zeros,
      name="attention_weights",
    )(query).reshape(b, q, h, lv * p)
    # Softmax jointly over levels and points, per head.
    weights = jax.nn.softmax(weights.astype(jnp.float32), axis=-1).reshape(b, q, h, lv, p)
    # Offsets are in pixels of the sampled level: normalise by (W_l, H_l).
    normalizer = jnp.asarray([[w_, h_] for h_, w_ in spatial_shapes], jnp.float32)
    locations = (
      reference_points[None, :, None, None, None, :].astype(jnp.float32)
      + offsets.astype(jnp.float32) / normalizer[None, None, None, :, None, :]
    )
    out = msda.multi_scale_deformable_attention(
      value,
      tuple(spatial_shapes),
      locations,
      weights.astype(value.dtype),
      implementation=self.implementation,
      interpret=self.interpret,
    )
    return nn.Dense(
      d,
      dtype=self.dtype,
      kernel_init=layers.xavier_uniform,
      bias_init=nn.initializers.zeros,
      name="output_proj",
    )(out)


class EncoderLayer(nn.Module):
  """Post-norm deformable encoder layer: `LN(x + MSDA(x + pos))`, then `LN(x + FFN(x))`."""

  ffn_dim: int = 1024
  num_heads: int = 8
  num_levels: int = 3
  num_points: int = 4
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  interpret: bool = False

  @nn.compact
  def __call__(self, x, pos, reference_points, spatial_shapes):
    d = x.shape[-1]
    attn = MSDeformAttn(
      self.num_heads,
      self.num_levels,
      self.num_points,
      self.implementation,
      self.dtype,
      self.interpret,
      name="self_attn",
    )(x + pos, reference_points, x, spatial_shapes)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm1")(x + attn)
    # The encoder's _reset_parameters applies xavier_uniform_ to every matrix; biases keep the
    # PyTorch default.
    y = layers.torch_dense(self.ffn_dim, d, self.dtype, "linear1", layers.xavier_uniform)(x)
    y = layers.torch_dense(d, self.ffn_dim, self.dtype, "linear2", layers.xavier_uniform)(
      nn.relu(y)
    )
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm2")(x + y)


def _encoder_reference_points(spatial_shapes: Sequence[tuple[int, int]]) -> np.ndarray:
  """Pixel centres `((j + 0.5) / W_l, (i + 0.5) / H_l)` of every level, concatenated: `[S, 2]`."""
  points = []
  for h, w in spatial_shapes:
    ys = (np.arange(h, dtype=np.float32) + 0.5) / np.float32(h)
    xs = (np.arange(w, dtype=np.float32) + 0.5) / np.float32(w)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    points.append(np.stack([xx.reshape(-1), yy.reshape(-1)], -1))
  return np.concatenate(points, 0)


class ConvNorm(nn.Module):
  """Conv (PyTorch padding) + GroupNorm(32) [+ ReLU]: detectron2's `Conv2d(norm=GN)`."""

  features: int
  kernel_size: int = 1
  use_bias: bool = False
  relu: bool = False
  kernel_init: Any = layers.c2_xavier_fill
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Conv2D(
      self.features,
      self.kernel_size,
      padding=self.kernel_size // 2,
      use_bias=self.use_bias,
      dtype=self.dtype,
      kernel_init=self.kernel_init,
      bias_init=nn.initializers.zeros,
      name="conv",
    )(x)
    x = nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=self.dtype, name="norm")(x)
    return nn.relu(x) if self.relu else x


class PixelDecoder(nn.Module):
  """`MSDeformAttnPixelDecoder`.

  Attributes:
    conv_dim: channels of every decoder feature map.
    mask_dim: channels of `mask_features`.
    num_layers: deformable encoder layers.
    num_heads: MSDA heads.
    num_points: MSDA sampling points per head and level.
    ffn_dim: encoder FFN width.
    num_levels: backbone levels fed to the encoder (the lowest-resolution ones).
    common_stride: stride of `mask_features`; levels between it and the encoder's finest level
      are added FPN style.
    msda_implementation: MSDA op implementation.
    dtype: compute dtype (the reference runs this module in float32).
    msda_interpret: run a Pallas MSDA kernel in interpret mode (tests on CPU).
  """

  conv_dim: int = 256
  mask_dim: int = 256
  num_layers: int = 6
  num_heads: int = 8
  num_points: int = 4
  ffn_dim: int = 1024
  num_levels: int = 3
  common_stride: int = 4
  msda_implementation: str | None = None
  dtype: Dtype = jnp.float32
  msda_interpret: bool = False

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
    """Runs the pixel decoder.

    Args:
      features: backbone maps `{"res2": [B, H/4, W/4, C2], ..., "res5": [B, H/32, W/32, C5]}`.

    Returns:
      `(mask_features [B, H/4, W/4, mask_dim], multi_scale_features)` where
      `multi_scale_features` holds the encoder outputs `[B, H_l, W_l, conv_dim]` from low to high
      resolution (strides 32, 16, 8 by default).
    """
    names = [n for n in FEATURE_NAMES if n in features]
    # Encoder levels from low to high resolution (res5, res4, res3).
    enc_names = names[-self.num_levels :][::-1]
    srcs, pos, shapes = [], [], []
    for lvl, name in enumerate(enc_names):
      x = features[name].astype(self.dtype)
      x = ConvNorm(
        self.conv_dim,
        use_bias=True,
        kernel_init=layers.xavier_uniform,
        dtype=self.dtype,
        name=f"input_proj_{lvl}",
      )(x)
      b, h, w, c = x.shape
      shapes.append((h, w))
      srcs.append(x.reshape(b, h * w, c))
      pos.append(sine_position_encoding(h, w, self.conv_dim // 2).reshape(h * w, self.conv_dim))
    level_embed = self.param(
      "level_embed", layers.standard_normal, (self.num_levels, self.conv_dim), jnp.float32
    )
    src = jnp.concatenate(srcs, axis=1)
    pos_embed = jnp.concatenate(
      [jnp.asarray(p) + level_embed[lvl] for lvl, p in enumerate(pos)], axis=0
    ).astype(self.dtype)
    # Broadcast over the batch once, for all layers: see `broadcast_to_batch` for why.
    pos_embed = layers.broadcast_to_batch(pos_embed, src.shape[0])
    reference_points = jnp.asarray(_encoder_reference_points(shapes))

    for i in range(self.num_layers):
      src = EncoderLayer(
        self.ffn_dim,
        self.num_heads,
        self.num_levels,
        self.num_points,
        self.msda_implementation,
        self.dtype,
        self.msda_interpret,
        name=f"encoder_layer_{i}",
      )(src, pos_embed, reference_points, tuple(shapes))

    # Split the sequence back into maps, low to high resolution.
    outs = []
    start = 0
    for h, w in shapes:
      outs.append(src[:, start : start + h * w].reshape(src.shape[0], h, w, self.conv_dim))
      start += h * w

    # FPN levels from the encoder's finest stride down to `common_stride` (only res2 by default).
    min_stride = 2 ** (FEATURE_NAMES.index(enc_names[-1]) + 2)
    num_fpn_levels = int(math.log2(min_stride) - math.log2(self.common_stride))
    for idx, name in enumerate(names[:num_fpn_levels][::-1]):
      lateral = ConvNorm(self.conv_dim, dtype=self.dtype, name=f"lateral_conv_{idx}")(
        features[name].astype(self.dtype)
      )
      # The reference's comment says "nearest" but it interpolates bilinearly.
      y = lateral + resize_bilinear(outs[-1], lateral.shape[1:3])
      outs.append(
        ConvNorm(self.conv_dim, 3, relu=True, dtype=self.dtype, name=f"output_conv_{idx}")(y)
      )

    mask_features = Conv2D(
      self.mask_dim,
      1,
      dtype=self.dtype,
      kernel_init=layers.c2_xavier_fill,
      bias_init=nn.initializers.zeros,
      name="mask_features",
    )(outs[-1])
    return mask_features, outs[: self.num_levels]
