"""ResNet backbone (torchvision / detectron2 "v1.5" bottleneck layout), channels-last.

The layout matches torchvision's `resnet50` / `resnet101` and the ResNets used by Mask2Former
(`STRIDE_IN_1X1: False`), so their checkpoints convert one-to-one (see
`mpformer_jax.convert.torchvision_resnet`):

  stem:   conv 7x7 / 2 (pad 3) -> norm -> ReLU -> maxpool 3x3 / 2 (pad 1)       -> stride 4
  stages: Bottleneck blocks; stage i (1..4) has bottleneck width `width * 2**(i-1)`,
          output channels 4x that, and stride 1, 2, 2, 2 in its first block  -> res2..res5

Variable tree (rooted at the `ResNet` module):

  stem_conv/kernel, stem_norm/...
  stage{i}_block{j}/{conv1,conv2,conv3}/kernel, {norm1,norm2,norm3}/...,
                    shortcut_conv/kernel, shortcut_norm/...   (first block of a stage only)

With `norm="frozen_bn"` every norm's `scale`, `bias`, `mean`, `var` is in `batch_stats`; with
`norm="bn"` `scale`, `bias` are in `params` and `mean`, `var` in `batch_stats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mpformer_jax.models.conv import Conv2D, max_pool2d
from mpformer_jax.models.norms import make_norm

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu"):
# an untruncated normal with variance 2 / (out_channels * kh * kw).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

BOTTLENECK_EXPANSION = 4
STAGE_NAMES = ("res2", "res3", "res4", "res5")


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> Conv2D:
  """A bias-free conv with torch's symmetric padding `kernel // 2` on every side.

  "SAME" would pad (0, 1) for an even input and stride 2, shifting the sampling grid by one
  pixel relative to torch and breaking checkpoint parity.
  """
  return Conv2D(
    features,
    kernel_size=kernel,
    stride=stride,
    padding=kernel // 2,
    use_bias=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=conv_kernel_init,
    name=name,
  )


class BottleneckBlock(nn.Module):
  """ResNet v1.5 bottleneck: 1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand, plus residual.

  Attributes:
    width: bottleneck width (channels of the 1x1 reduce and the 3x3 conv).
    stride: spatial stride of the 3x3 conv and of the projection shortcut.
    norm: `"frozen_bn"` or `"bn"` (see `make_norm`).
    dtype: compute dtype.
  """

  width: int
  stride: int = 1
  norm: str = "frozen_bn"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Runs the block.

    Args:
      x: `[B, H, W, C_in]`.
      train: passed to the norms (batch statistics for `norm="bn"`).

    Returns:
      `[B, H / stride, W / stride, 4 * width]`.
    """
    out_channels = self.width * BOTTLENECK_EXPANSION

    def norm(name):
      return make_norm(self.norm, train=train, dtype=self.dtype, name=name)

    y = _conv(self.width, 1, 1, self.dtype, "conv1")(x)
    y = nn.relu(norm("norm1")(y))
    y = _conv(self.width, 3, self.stride, self.dtype, "conv2")(y)
    y = nn.relu(norm("norm2")(y))
    y = _conv(out_channels, 1, 1, self.dtype, "conv3")(y)
    y = norm("norm3")(y)

    # Project the identity only when its shape changes (torchvision: stride != 1 or channel
    # mismatch), which in practice is the first block of every stage.
    if self.stride != 1 or x.shape[-1] != out_channels:
      shortcut = _conv(out_channels, 1, self.stride, self.dtype, "shortcut_conv")(x)
      shortcut = norm("shortcut_norm")(shortcut)
    else:
      shortcut = x.astype(self.dtype)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """Bottleneck ResNet returning the four stage outputs (torchvision / detectron2 layout).

  Attributes:
    depths: blocks per stage; ResNet-50 is (3, 4, 6, 3), ResNet-101 (3, 4, 23, 3).
    stem_width: output channels of the 7x7 stem conv.
    width: bottleneck width of the first stage; stage i (0-based) uses `width * 2**i` and outputs
      `4 * width * 2**i` channels.
    norm: `"frozen_bn"` (detectron2 FrozenBatchNorm2d) or `"bn"` (BatchNorm; SyncBN when run
      under `jax.jit` on a sharded batch).
    dtype: compute dtype; parameters stay float32.
  """

  depths: Sequence[int] = (3, 4, 6, 3)
  stem_width: int = 64
  width: int = 64
  norm: str = "frozen_bn"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Computes the multi-scale features.

    Args:
      x: `[B, H, W, 3]` normalised images, channels last.
      train: use batch statistics (and update `batch_stats`) when `norm="bn"`; call `apply`
        with `mutable=["batch_stats"]` then.

    Returns:
      `{"res2": [B, H/4, W/4, 4w], "res3": [B, H/8, W/8, 8w], "res4": [B, H/16, W/16, 16w],
      "res5": [B, H/32, W/32, 32w]}` with `w = width` (sizes rounded up like torch), in
      `self.dtype`.
    """
    if len(self.depths) != len(STAGE_NAMES):
      raise ValueError(f"ResNet needs {len(STAGE_NAMES)} stage depths, got {self.depths}")
    x = x.astype(self.dtype)
    x = _conv(self.stem_width, 7, 2, self.dtype, "stem_conv")(x)
    x = make_norm(self.norm, train=train, dtype=self.dtype, name="stem_norm")(x)
    x = nn.relu(x)
    x = max_pool2d(x, kernel_size=3, stride=2, padding=1)

    outputs = {}
    for i, (depth, out_name) in enumerate(zip(self.depths, STAGE_NAMES, strict=True)):
      for j in range(depth):
        x = BottleneckBlock(
          width=self.width * 2**i,
          stride=2 if (i > 0 and j == 0) else 1,
          norm=self.norm,
          dtype=self.dtype,
          name=f"stage{i + 1}_block{j}",
        )(x, train=train)
      outputs[out_name] = x
    return outputs

  @property
  def out_channels(self) -> dict[str, int]:
    """Channels of each output, e.g. `{"res2": 256, ..., "res5": 2048}` for ResNet-50."""
    return {name: self.width * 2**i * BOTTLENECK_EXPANSION for i, name in enumerate(STAGE_NAMES)}

  @property
  def out_strides(self) -> dict[str, int]:
    """Stride of each output relative to the input: 4, 8, 16, 32."""
    return {name: 4 * 2**i for i, name in enumerate(STAGE_NAMES)}
