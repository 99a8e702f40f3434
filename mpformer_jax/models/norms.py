"""Normalisation layers for the convolutional backbone.

Two kinds are supported, selected by name through `make_norm`:

* `"frozen_bn"`: detectron2's `FrozenBatchNorm2d`. An affine map built from fixed BatchNorm
  statistics. All four tensors live in the non-trainable `batch_stats` collection, so an
  optimiser that only sees `params` never updates them.
* `"bn"`: flax `nn.BatchNorm` configured like torch `BatchNorm2d`. When the model runs under
  `jax.jit` on a batch sharded over devices, the batch mean and variance are reductions over
  the *global* (logical) batch, so this is SyncBN without any `axis_name`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# torch BatchNorm2d / detectron2 FrozenBatchNorm2d default.
BN_EPSILON = 1e-5
# flax keeps `momentum * running + (1 - momentum) * batch`; torch's momentum=0.1 is the weight of
# the batch statistic, so the flax equivalent is 0.9.
BN_MOMENTUM = 0.9

NORM_KINDS = ("frozen_bn", "bn")


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine (detectron2 `FrozenBatchNorm2d`).

  Computes `y = x * scale' + bias'` with `scale' = scale * rsqrt(var + eps)` and
  `bias' = bias - mean * scale'`. The four tensors are variables of the `batch_stats`
  collection (initialised to scale 1, bias 0, mean 0, var 1), never `params`.

  Attributes:
    epsilon: added to `var` before the reciprocal square root.
    dtype: compute / output dtype. The folded affine is computed in float32 and then cast.
  """

  epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the frozen affine.

    Args:
      x: `[..., C]` channels-last features.

    Returns:
      `[..., C]` in `self.dtype`.
    """
    c = x.shape[-1]
    scale = self.variable("batch_stats", "scale", lambda: jnp.ones((c,), jnp.float32)).value
    bias = self.variable("batch_stats", "bias", lambda: jnp.zeros((c,), jnp.float32)).value
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32)).value
    var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32)).value
    # Fold in float32 even for a low-precision compute dtype: rsqrt of a small variance loses
    # most of its precision in bfloat16.
    folded_scale = scale.astype(jnp.float32) * jax.lax.rsqrt(var.astype(jnp.float32) + self.epsilon)
    folded_bias = bias.astype(jnp.float32) - mean.astype(jnp.float32) * folded_scale
    x = x.astype(self.dtype)
    return x * folded_scale.astype(self.dtype) + folded_bias.astype(self.dtype)


def make_norm(
  kind: str,
  *,
  train: bool = False,
  dtype: Any = jnp.float32,
  name: str | None = None,
) -> nn.Module:
  """Builds a channels-last normalisation layer by name.

  Args:
    kind: `"frozen_bn"` (fixed statistics, nothing trainable) or `"bn"` (BatchNorm that uses
      batch statistics when `train` and running statistics otherwise; SyncBN under a sharded
      `jax.jit`). Both use epsilon 1e-5; `"bn"` updates running statistics with torch's
      momentum 0.1 (flax momentum 0.9). flax uses the biased batch variance for the running
      update where torch uses the unbiased one (a factor n / (n - 1), n = B * H * W).
    train: only for `"bn"`: normalise with batch statistics and update `batch_stats`.
    dtype: compute / output dtype; parameters and statistics stay float32.
    name: submodule name.

  Returns:
    A Linen module mapping `[..., C]` to `[..., C]`.
  """
  if kind == "frozen_bn":
    return FrozenBatchNorm(dtype=dtype, name=name)
  if kind == "bn":
    return nn.BatchNorm(
      use_running_average=not train,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPSILON,
      dtype=dtype,
      param_dtype=jnp.float32,
      # Two-pass variance (E[(x - mean)^2]) like torch, instead of E[x^2] - E[x]^2, which
      # cancels catastrophically for features with a large mean.
      use_fast_variance=False,
      name=name,
    )
  raise ValueError(f"unknown norm kind {kind!r}; expected one of {NORM_KINDS}")
