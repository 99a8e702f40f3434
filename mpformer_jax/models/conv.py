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


def _pad_spatial(x, padding: int, value: float = 0.0):
  """`[B, H, W, C]` padded by `padding` on every side of H and W."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jnp.pad(x, pad, constant_values=value)


def _window_taps(xp, kernel_size: int, stride: int, out_hw: tuple[int, int]):
  """The `k*k` strided views of the padded input that one output position reads, row-major."""
  ho, wo = out_hw
  return [
    xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
    for i in range(kernel_size)
    for j in range(kernel_size)
  ]


def _patches(x, kernel_size: int, stride: int, padding: int, out_hw: tuple[int, int]):
  """im2col: `[B, Ho, Wo, k*k*C]` with taps in (row, column, channel) order, like HWIO."""
  taps = _window_taps(_pad_spatial(x, padding), kernel_size, stride, out_hw)
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
  convolutions at 512 x 512 images (128 x 128 maps), 0.9-1.2x on its other stride-1 ones
  (slower only on the 8 x 8, 512-channel maps of 256 x 256 images).

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
  xp = _pad_spatial(x, padding)
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
    taps = _window_taps(_pad_spatial(x, padding), kh, stride, dy.shape[1:3])
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


def _pool_geometry(shape, kernel_size: int, stride: int, padding: int):
  _, h, w, _ = shape
  ho = (h + 2 * padding - kernel_size) // stride + 1
  wo = (w + 2 * padding - kernel_size) // stride + 1
  return ho, wo


def _pool_forward(x, kernel_size: int, stride: int, padding: int):
  """Max and the row-major index of the first maximal tap (PyTorch's choice) per output."""
  out_hw = _pool_geometry(x.shape, kernel_size, stride, padding)
  taps = _window_taps(_pad_spatial(x, padding, -jnp.inf), kernel_size, stride, out_hw)
  best, index = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
  for t, tap in enumerate(taps[1:], start=1):
    larger = tap > best  # strict: the first of tied maxima keeps the gradient, as in PyTorch
    best = jnp.where(larger, tap, best)
    index = jnp.where(larger, jnp.int8(t), index)
  return best, index


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, kernel_size: int, stride: int, padding: int, in_hw: tuple[int, int]):
  del in_hw  # for the backward pass
  return _pool_forward(x, kernel_size, stride, padding)[0]


def _max_pool_fwd(x, kernel_size, stride, padding, in_hw):
  del in_hw
  out, index = _pool_forward(x, kernel_size, stride, padding)
  return out, index


def _max_pool_bwd(kernel_size, stride, padding, in_hw, index, dy):
  h, w = in_hw
  ho, wo = index.shape[1:3]
  hp, wp = h + 2 * padding, w + 2 * padding
  zero = jnp.zeros((), dy.dtype)
  dxp = None
  for t in range(kernel_size * kernel_size):
    i, j = divmod(t, kernel_size)
    routed = jnp.where(index == t, dy, zero)
    # Output (h, w) read padded input (i + stride * h, j + stride * w): an interior pad puts
    # it back there.
    config = (
      (0, 0, 0),
      (i, hp - i - stride * (ho - 1) - 1, stride - 1),
      (j, wp - j - stride * (wo - 1) - 1, stride - 1),
      (0, 0, 0),
    )
    placed = jax.lax.pad(routed, zero, config)
    dxp = placed if dxp is None else dxp + placed
  return (dxp[:, padding : padding + h, padding : padding + w],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool2d(x: jax.Array, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
  """`torch.nn.MaxPool2d` on `[B, H, W, C]` (padding reads as -inf), value and gradient.

  The maximum over the `k*k` strided window taps, with a custom gradient that routes each
  output's gradient to the first maximal tap in row-major order, exactly as PyTorch does
  (also with ties). XLA:CPU's own paths were slow here: `select_and_scatter` (the gradient of
  `reduce_window` max) ~5x this; differentiating the chain of `maximum`s fuses into one loop
  that recomputes the chain for each of the `k*k` taps (R50 at 256 x 256, batch 2: 33 ms for
  the fusion of the pool's, the stem ReLU's and the stem norm's gradients, 6.6 ms with this).
  """
  return _max_pool(x, kernel_size, stride, padding, tuple(x.shape[1:3]))
