"""2-D convolution with PyTorch padding and a fast backward pass on XLA:CPU.

Accelerators get plain `lax.conv_general_dilated` (cuDNN / the TPU convolution unit). On the CPU
XLA's convolution *weight* gradient runs 2-8x slower than its forward pass, which made training
steps there slower than PyTorch's. So on the CPU:

- a 1x1 convolution is a 2-D matrix product over the channel axis (forward and backward are
  GEMMs);
- a kxk convolution keeps XLA's forward and input gradient, and computes the weight gradient
  with GEMMs over the shifted input (one im2col GEMM when C_in is small, one GEMM over
  row- and column-shifted copies at stride 1, one per tap otherwise): 6-7x faster than XLA's
  weight gradient at the pixel decoder's 3x3, 256-channel convolution.

Parameters are the same as `flax.linen.Conv`'s (`kernel [kh, kw, C_in, C_out]`, `bias [C_out]`),
so checkpoints and converters do not care which path ran.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, kernel, stride: int, padding: int):
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (stride, stride),
    ((padding, padding), (padding, padding)),
    dimension_numbers=_DIMENSIONS,
  )


def _patches(x, kernel_size: int, stride: int, padding: int, out_hw: tuple[int, int]):
  """im2col: `[B, Ho, Wo, k*k*C]` with taps in (row, column, channel) order, like HWIO."""
  ho, wo = out_hw
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  taps = [
    xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
    for i in range(kernel_size)
    for j in range(kernel_size)
  ]
  return jnp.concatenate(taps, axis=-1)


def _weight_grad_stride_1(x, dy, kernel_size: int, padding: int):
  """Weight gradient of a stride-1 convolution as one GEMM: `[k*C, N] @ [N, k*O]`.

  `dW[i, j] = sum_{b,h,w} xp[b, h + i, w + j] dy[b, h, w]` (`xp`: the padded input). The
  column taps `j` become channels of `xp` (a width-only im2col, `k` times the input), and
  the row taps `i` become channels of `dy` padded with `i` rows above and `k - 1 - i` below
  (`dy[h' - i]` lines up with `xp[h']`; the padding rows keep images apart). One product over
  all `B * (H + 2p) * W_out` positions then gives every `(j, c, i, o)` entry. Against one GEMM
  per tap over strided slices of `xp` (`k * k` input-sized copies, `k * k` small products),
  this copies `k` inputs and `k` output gradients: 1.3x faster on R50's 64-channel 3x3
  convolutions at 512 x 256 pixels (128 x 128 maps), 1.0-1.1x on the others.

  Args:
    x: `[B, H, W, C]` input.
    dy: `[B, H_out, W_out, O]` output gradient (`H_out = H + 2 * padding - k + 1`).
    kernel_size: `k`.
    padding: symmetric zero padding.

  Returns:
    `[k, k, C, O]` float32.
  """
  k = kernel_size
  cin, cout = x.shape[-1], dy.shape[-1]
  wo = dy.shape[2]
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  columns = jnp.concatenate([xp[:, :, j : j + wo] for j in range(k)], axis=-1)
  rows = jnp.concatenate(
    [jnp.pad(dy, ((0, 0), (i, k - 1 - i), (0, 0), (0, 0))) for i in range(k)], axis=-1
  )
  grad = jax.lax.dot_general(
    columns.reshape(-1, k * cin),
    rows.reshape(-1, k * cout),
    (((0,), (0,)), ((), ())),
    preferred_element_type=jnp.float32,
  )  # [(j, c), (i, o)]
  return grad.reshape(k, cin, k, cout).transpose(2, 0, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_gemm_weight_grad(x, kernel, stride: int, padding: int):
  return _lax_conv(x, kernel, stride, padding)


def _conv_fwd(x, kernel, stride, padding):
  return _lax_conv(x, kernel, stride, padding), (x, kernel)


def _conv_bwd(stride, padding, residuals, dy):
  x, kernel = residuals
  kh, kw, cin, cout = kernel.shape
  # Input gradient: XLA's transposed convolution is as fast as its forward pass.
  _, vjp_x = jax.vjp(lambda x: _lax_conv(x, kernel, stride, padding), x)
  (dx,) = vjp_x(dy)
  dy2 = dy.reshape(-1, cout)
  if stride == 1 and cin >= 64:
    dkernel = _weight_grad_stride_1(x, dy, kh, padding)
  elif cin < 64:
    # Few input channels (the stem): one GEMM over the im2col patches.
    patches = _patches(x, kh, stride, padding, dy.shape[1:3]).reshape(-1, kh * kw * cin)
    dkernel = jnp.dot(patches.T, dy2, preferred_element_type=jnp.float32)
  else:
    # One GEMM per tap over the shifted input: no k*k-times larger patch tensor in memory.
    ho, wo = dy.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    taps = [
      xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
      for i in range(kh)
      for j in range(kw)
    ]
    dkernel = jnp.stack(
      [jnp.dot(t.reshape(-1, cin).T, dy2, preferred_element_type=jnp.float32) for t in taps]
    )
  return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


_conv_gemm_weight_grad.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0) -> jax.Array:
  """`[B, H, W, C_in] * [kh, kw, C_in, C_out]` with symmetric zero padding (PyTorch's).

  Picks the fastest formulation for the current backend (see the module docstring); all give
  the same result.
  """
  if jax.default_backend() != "cpu":
    return _lax_conv(x, kernel, stride, padding)
  kh, kw, cin, cout = kernel.shape
  if kh == kw == 1 and padding == 0:
    if stride > 1:
      x = x[:, ::stride, ::stride, :]
    # A 2-D product, not `einsum("bhwc,cd->bhwd")`: the einsum's weight gradient contracts
    # three axes, and XLA:CPU copies the output gradient into a transposed layout for it (a
    # 1x1 convolution's forward+backward measured 2-3x faster this way; R50 Mask2Former's
    # forward+backward 5% faster at 256 x 256).
    b, h, w, _ = x.shape
    return (x.reshape(b * h * w, cin) @ kernel[0, 0]).reshape(b, h, w, cout)
  return _conv_gemm_weight_grad(x, kernel, stride, padding)


class Conv2D(nn.Module):
  """Drop-in for `nn.Conv` with square kernels and PyTorch-style symmetric padding.

  Attributes:
    features: output channels.
    kernel_size: square kernel size.
    stride: square stride.
    padding: zero padding on every side (PyTorch's `padding=`).
    use_bias: add a bias.
    dtype: compute dtype (parameters stay `param_dtype`).
    param_dtype: parameter dtype.
    kernel_init: kernel initialiser for `[kh, kw, C_in, C_out]`.
    bias_init: bias initialiser.
  """

  features: int
  kernel_size: int = 1
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Convolves `x` `[B, H, W, C_in]` into `[B, H', W', features]`."""
    k = self.kernel_size
    kernel = self.param(
      "kernel", self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype
    )
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def max_pool2d(x: jax.Array, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
  """`torch.nn.MaxPool2d` on `[B, H, W, C]` (padding reads as -inf).

  Written as a maximum over the `k*k` strided window taps: XLA:CPU's `select_and_scatter`
  (the gradient of `reduce_window` max) is ~5x slower than this, and the forward value is
  identical. With tied maxima the gradient is split between them, where PyTorch routes it to
  one; after a ReLU the only ties are zeros, whose gradient the ReLU discards anyway.
  """
  _, h, w, _ = x.shape
  ho = (h + 2 * padding - kernel_size) // stride + 1
  wo = (w + 2 * padding - kernel_size) // stride + 1
  xp = jnp.pad(
    x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf
  )
  out = None
  for i in range(kernel_size):
    for j in range(kernel_size):
      tap = xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
      out = tap if out is None else jnp.maximum(out, tap)
  return out
