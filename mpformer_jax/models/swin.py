"""Swin Transformer backbone (Swin-T/S/B/L) as Mask2Former uses it, channels-last.

Follows the original Swin Transformer for dense prediction (detectron2's `D2SwinTransformer` in
Mask2Former): feature maps whose size is not a multiple of the window are padded on the
right/bottom before window partitioning and cropped back afterwards, and every stage output gets
its own LayerNorm. (Hugging Face's `SwinModel` instead shrinks the window and drops the shift when
a stage is no larger than the window; its `SwinBackbone` passes `always_partition=True`, which
makes it behave like the original.)

  patch_embed:  pad to a multiple of patch_size -> conv p x p / p -> LayerNorm  -> stride p
  layers_i:     depths[i] Swin blocks (window attention, shifted on odd blocks), then
                PatchMerging (2x2 concat -> LayerNorm(4C) -> Linear(4C -> 2C)) for i < 3
  norm_i:       LayerNorm on stage i's output (before its patch merging) -> res{i+2}

Variable tree (all in `params`, rooted at the `SwinTransformer` module; the names mirror the
original PyTorch implementation so its checkpoints map one-to-one):

  patch_embed/proj/{kernel,bias}             conv [p, p, 3, C]
  patch_embed/norm/{scale,bias}              (only with patch_norm=True)
  layers_{i}/blocks_{j}/norm1/{scale,bias}
  layers_{i}/blocks_{j}/attn/qkv/{kernel,bias}                      [C_i, 3 C_i] (q | k | v)
  layers_{i}/blocks_{j}/attn/relative_position_bias_table           [(2w-1)^2, heads_i]
  layers_{i}/blocks_{j}/attn/proj/{kernel,bias}
  layers_{i}/blocks_{j}/norm2/{scale,bias}
  layers_{i}/blocks_{j}/mlp/{fc1,fc2}/{kernel,bias}
  layers_{i}/downsample/norm/{scale,bias}     (i < num_stages - 1)
  layers_{i}/downsample/reduction/kernel      [4 C_i, 2 C_i], no bias
  norm{i}/{scale,bias}

with C_i = embed_dim * 2**i.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

STAGE_NAMES = ("res2", "res3", "res4", "res5")

# PyTorch nn.LayerNorm's default epsilon (flax's default is 1e-6).
LN_EPS = 1e-5

# The original initialises every nn.Linear weight and the relative position bias table with
# timm's trunc_normal_(std=0.02), and every Linear bias with zeros. timm truncates at the absolute
# values +-2 (= +-100 std), not at +-2 std as flax's default, so its std really is 0.02.
trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
# The patch-embedding conv keeps PyTorch's default Conv2d init (kaiming_uniform_ a=sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight, and the same bound for the bias.
torch_conv_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_conv_bias(fan_in: int):
  bound = 1.0 / fan_in**0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  # use_fast_variance=False: E[(x - mean)^2] like PyTorch, not E[x^2] - mean^2, which loses
  # precision on the large-mean activations of deep residual streams.
  return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, name=name)


def _dense(features: int, dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=trunc_normal_02,
    bias_init=nn.initializers.zeros,
    name=name,
  )


@functools.cache
def relative_position_index(window_size: int) -> np.ndarray:
  """Index into the relative position bias table for every (query, key) pair of a window.

  Args:
    window_size: side w of the square window.

  Returns:
    int32 `[w*w, w*w]`; entry (i, j) is `(dy + w - 1) * (2w - 1) + (dx + w - 1)` where
    (dy, dx) is the offset from token j to token i (row-major tokens within the window).
  """
  w = window_size
  ys, xs = np.meshgrid(np.arange(w), np.arange(w), indexing="ij")
  coords = np.stack([ys.reshape(-1), xs.reshape(-1)])  # [2, N]
  rel = coords[:, :, None] - coords[:, None, :] + (w - 1)  # [2, N, N], in [0, 2w - 2]
  return (rel[0] * (2 * w - 1) + rel[1]).astype(np.int32)


# Bounded: one entry per distinct padded feature size seen at trace time.
@functools.lru_cache(maxsize=64)
def shifted_window_regions(height: int, width: int, window_size: int, shift: int) -> np.ndarray:
  """Region label of every token of every window after the cyclic shift.

  After shifting a padded `[height, width]` map by `-shift`, a window at the bottom/right edge
  holds tokens from up to four image regions that were not adjacent before the shift; tokens
  may only attend within their own region. Each axis splits into `[0, L - w)`,
  `[L - w, L - shift)`, `[L - shift, L)`, and a token's label is `row_part * 3 + col_part`.

  Args:
    height: padded feature height (a multiple of `window_size`).
    width: padded feature width (a multiple of `window_size`).
    window_size: w.
    shift: cyclic shift s (0 < s < w).

  Returns:
    int32 `[num_windows, w*w]`, windows and tokens in `window_partition` order.
  """
  w = window_size

  def parts(length: int) -> np.ndarray:
    idx = np.arange(length)
    return (idx >= length - w).astype(np.int32) + (idx >= length - shift).astype(np.int32)

  label = parts(height)[:, None] * 3 + parts(width)[None, :]  # [H, W]
  return label.reshape(height // w, w, width // w, w).transpose(0, 2, 1, 3).reshape(-1, w * w)


def region_mask(regions: jax.Array | np.ndarray) -> jax.Array:
  """Additive attention mask from `shifted_window_regions`: `[nW, N]` -> float32 `[nW, N, N]`.

  0 within a region and -100 across regions (the original's value: it vanishes after softmax
  and stays finite in bf16). Built on device from the small label array: the full mask would be
  a constant of tens of MB in the compiled program at 1024 px with window 12.
  """
  regions = jnp.asarray(regions)
  same = regions[:, :, None] == regions[:, None, :]
  return jnp.where(same, 0.0, -100.0).astype(jnp.float32)


def shifted_window_mask(height: int, width: int, window_size: int, shift: int) -> np.ndarray:
  """`region_mask(shifted_window_regions(...))` as numpy float32 `[nW, w*w, w*w]`."""
  regions = shifted_window_regions(height, width, window_size, shift)
  return np.where(regions[:, :, None] == regions[:, None, :], 0.0, -100.0).astype(np.float32)


def window_partition(x: jax.Array, window_size: int) -> jax.Array:
  """`[B, H, W, C]` (H, W multiples of w) -> `[B, (H/w)(W/w), w*w, C]`, windows row-major."""
  b, h, w_, c = x.shape
  ws = window_size
  x = x.reshape(b, h // ws, ws, w_ // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // ws) * (w_ // ws), ws * ws, c)


def window_reverse(windows: jax.Array, window_size: int, height: int, width: int) -> jax.Array:
  """Inverse of `window_partition`: `[B, nW, w*w, C]` -> `[B, height, width, C]`."""
  b, _, _, c = windows.shape
  ws = window_size
  x = windows.reshape(b, height // ws, width // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, c)


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Stochastic depth: zeroes the whole residual branch per sample, rescaling the survivors.

  Args:
    x: `[B, ...]` residual branch output.
    rate: probability of dropping a sample's branch.
    rng: PRNG key.

  Returns:
    `x` with each sample either zeroed or divided by `1 - rate`.
  """
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> C channels (conv with stride p), then LayerNorm.

  Attributes:
    patch_size: p.
    embed_dim: output channels C.
    patch_norm: whether to apply the LayerNorm.
    dtype: compute dtype.
  """

  patch_size: int
  embed_dim: int
  patch_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, H, W, Cin]` -> `[B, ceil(H/p), ceil(W/p), C]` (zero-pads right/bottom first)."""
    p = self.patch_size
    _, h, w, cin = x.shape
    if h % p or w % p:
      x = jnp.pad(x, ((0, 0), (0, (-h) % p), (0, (-w) % p), (0, 0)))
    x = nn.Conv(
      self.embed_dim,
      kernel_size=(p, p),
      strides=(p, p),
      padding="VALID",
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=torch_conv_kernel,
      bias_init=_torch_conv_bias(cin * p * p),
      name="proj",
    )(x)
    if self.patch_norm:
      x = _layer_norm(self.dtype, "norm")(x)
    return x


class WindowAttention(nn.Module):
  """Multi-head self-attention within windows, with a learned relative position bias.

  Attributes:
    dim: channels C.
    num_heads: attention heads (C must be divisible by it).
    window_size: side w of the square window.
    qkv_bias: whether the fused q/k/v projection has a bias.
    dtype: compute dtype (logits and softmax are computed in float32).
  """

  dim: int
  num_heads: int
  window_size: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Attends within each window, all windows in one batched computation.

    Args:
      x: `[B, nW, N, C]` tokens grouped by window, N = w*w.
      mask: optional float32 `[nW, N, N]` additive mask (shifted windows).

    Returns:
      `[B, nW, N, C]`.
    """
    b, nw, n, c = x.shape
    heads = self.num_heads
    if c % heads:
      raise ValueError(f"channels {c} not divisible by num_heads {heads}")
    head_dim = c // heads
    qkv = _dense(3 * c, self.dtype, "qkv", use_bias=self.qkv_bias)(x)
    qkv = qkv.reshape(b, nw, n, 3, heads, head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [B, nW, N, h, d]
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k, preferred_element_type=jnp.float32)

    table = self.param(
      "relative_position_bias_table",
      trunc_normal_02,
      ((2 * self.window_size - 1) ** 2, heads),
      jnp.float32,
    )
    index = relative_position_index(self.window_size).reshape(-1)  # static numpy
    bias = table[index].reshape(n, n, heads).transpose(2, 0, 1)  # [h, N, N]
    logits = logits + bias.astype(jnp.float32)
    if mask is not None:
      logits = logits + mask[None, :, None, :, :]
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)

    out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs, v.astype(self.dtype)).reshape(b, nw, n, c)
    return _dense(c, self.dtype, "proj")(out)


class Mlp(nn.Module):
  """Linear -> GELU (exact, erf) -> Linear.

  Attributes:
    hidden_dim: width of the hidden layer.
    out_dim: output channels.
    dtype: compute dtype.
  """

  hidden_dim: int
  out_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., C]` -> `[..., out_dim]`."""
    x = _dense(self.hidden_dim, self.dtype, "fc1")(x)
    x = nn.gelu(x, approximate=False)
    return _dense(self.out_dim, self.dtype, "fc2")(x)


class SwinBlock(nn.Module):
  """Pre-norm (shifted) window attention and MLP, each with a residual and stochastic depth.

  Attributes:
    dim: channels C.
    num_heads: attention heads.
    window_size: side w of the windows.
    shift_size: cyclic shift (0 for regular windows, w // 2 for shifted ones).
    mlp_ratio: MLP hidden width / C.
    qkv_bias: whether the q/k/v projection has a bias.
    drop_path_rate: stochastic depth rate of this block.
    dtype: compute dtype.
  """

  dim: int
  num_heads: int
  window_size: int
  shift_size: int = 0
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32

  def _drop_path(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.drop_path_rate == 0.0:
      return x
    return drop_path(x, self.drop_path_rate, self.make_rng("dropout"))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Runs the block.

    Args:
      x: `[B, H, W, C]`.
      train: enables stochastic depth (needs the 'dropout' RNG).

    Returns:
      `[B, H, W, C]`.
    """
    _, h, w, _ = x.shape
    ws, shift = self.window_size, self.shift_size

    y = _layer_norm(self.dtype, "norm1")(x)
    # Pad after the norm (as the original does) so padded tokens are exact zeros; they are not
    # masked out of the attention, matching the original.
    pad_h, pad_w = (-h) % ws, (-w) % ws
    if pad_h or pad_w:
      y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w

    mask = None
    if shift > 0:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
      mask = region_mask(shifted_window_regions(hp, wp, ws, shift))
    y = WindowAttention(self.dim, self.num_heads, ws, self.qkv_bias, self.dtype, name="attn")(
      window_partition(y, ws), mask
    )
    y = window_reverse(y, ws, hp, wp)
    if shift > 0:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    y = y[:, :h, :w, :]
    x = x + self._drop_path(y, train)

    y = _layer_norm(self.dtype, "norm2")(x)
    y = Mlp(int(self.dim * self.mlp_ratio), self.dim, self.dtype, name="mlp")(y)
    return x + self._drop_path(y, train)


class PatchMerging(nn.Module):
  """Halves the resolution and doubles the channels: 2x2 concat -> LayerNorm -> Linear.

  Attributes:
    dim: input channels C (output has 2C).
    dtype: compute dtype.
  """

  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, H, W, C]` -> `[B, ceil(H/2), ceil(W/2), 2C]` (odd sizes are zero-padded first)."""
    _, h, w, _ = x.shape
    if h % 2 or w % 2:
      x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    # The channel order (row, col) = (0,0), (1,0), (0,1), (1,1) is what checkpoints expect.
    x = jnp.concatenate(
      [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1
    )
    x = _layer_norm(self.dtype, "norm")(x)
    return _dense(2 * self.dim, self.dtype, "reduction", use_bias=False)(x)


class SwinStage(nn.Module):
  """`len(drop_path_rates)` Swin blocks (shifted on odd ones), then optional patch merging.

  Attributes:
    dim: channels C of this stage.
    num_heads: attention heads.
    window_size: side w of the windows.
    drop_path_rates: stochastic depth rate of each block; its length is the stage depth.
    mlp_ratio: MLP hidden width / C.
    qkv_bias: whether the q/k/v projections have a bias.
    downsample: whether to end with `PatchMerging`.
    dtype: compute dtype.
  """

  dim: int
  num_heads: int
  window_size: int
  drop_path_rates: Sequence[float]
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  downsample: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Runs the stage.

    Args:
      x: `[B, H, W, C]`.
      train: enables stochastic depth.

    Returns:
      `(out, next)`: the block output `[B, H, W, C]` (the stage's feature map) and the input
      of the next stage, `[B, ceil(H/2), ceil(W/2), 2C]` (or `out` without downsampling).
    """
    for j, rate in enumerate(self.drop_path_rates):
      x = SwinBlock(
        dim=self.dim,
        num_heads=self.num_heads,
        window_size=self.window_size,
        shift_size=0 if j % 2 == 0 else self.window_size // 2,
        mlp_ratio=self.mlp_ratio,
        qkv_bias=self.qkv_bias,
        drop_path_rate=float(rate),
        dtype=self.dtype,
        name=f"blocks_{j}",
      )(x, train)
    if not self.downsample:
      return x, x
    return x, PatchMerging(self.dim, self.dtype, name="downsample")(x)


class SwinTransformer(nn.Module):
  """Swin Transformer backbone returning four normalised feature maps (strides 4 to 32).

  Defaults are Swin-T; Swin-S uses depths (2, 2, 18, 2); Swin-B embed_dim 128, heads
  (4, 8, 16, 32); Swin-L embed_dim 192, heads (6, 12, 24, 48) (window 12 for the 384 models).

  Attributes:
    patch_size: patch embedding stride p.
    embed_dim: channels C of the first stage (stage i has C * 2**i).
    depths: blocks per stage.
    num_heads: attention heads per stage.
    window_size: side w of the attention windows.
    mlp_ratio: MLP hidden width / channels.
    qkv_bias: whether the q/k/v projections have a bias.
    drop_path_rate: stochastic depth rate of the last block; it rises linearly from 0 over all
      blocks. Active only with `train=True` (uses the 'dropout' RNG).
    patch_norm: LayerNorm after the patch embedding.
    dtype: compute dtype; parameters are always float32.
  """

  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.3
  patch_norm: bool = True
  dtype: Dtype = jnp.float32

  @property
  def out_channels(self) -> dict[str, int]:
    """Channels of each returned feature map."""
    return {name: self.embed_dim * 2**i for i, name in enumerate(STAGE_NAMES[: len(self.depths)])}

  @property
  def out_strides(self) -> dict[str, int]:
    """Stride of each returned feature map relative to the input."""
    return {name: self.patch_size * 2**i for i, name in enumerate(STAGE_NAMES[: len(self.depths)])}

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Computes the feature pyramid.

    Args:
      x: images `[B, H, W, 3]` (any H, W; padded on the right/bottom as needed).
      train: enables stochastic depth.

    Returns:
      `{"res2": [B, H/4, W/4, C], "res3": [B, H/8, W/8, 2C], "res4": [B, H/16, W/16, 4C],
      "res5": [B, H/32, W/32, 8C]}` (sizes rounded up) in `dtype`, for patch_size 4.
    """
    if len(self.depths) != len(self.num_heads) or len(self.depths) > len(STAGE_NAMES):
      raise ValueError(f"bad depths {self.depths} / num_heads {self.num_heads}")
    x = PatchEmbed(
      self.patch_size, self.embed_dim, self.patch_norm, self.dtype, name="patch_embed"
    )(x.astype(self.dtype))

    # Linearly increasing stochastic depth over all blocks (torch.linspace(0, rate, n)).
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    features = {}
    start = 0
    num_stages = len(self.depths)
    for i, depth in enumerate(self.depths):
      out, x = SwinStage(
        dim=self.embed_dim * 2**i,
        num_heads=self.num_heads[i],
        window_size=self.window_size,
        drop_path_rates=tuple(rates[start : start + depth]),
        mlp_ratio=self.mlp_ratio,
        qkv_bias=self.qkv_bias,
        downsample=i < num_stages - 1,
        dtype=self.dtype,
        name=f"layers_{i}",
      )(x, train)
      start += depth
      features[STAGE_NAMES[i]] = _layer_norm(self.dtype, f"norm{i}")(out)
    return features
