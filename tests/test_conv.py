"""The CPU-tuned convolution and max-pool equal the plain XLA / PyTorch operations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mpformer_jax.models.conv import conv2d, max_pool2d


def _reference_conv(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (stride, stride),
    ((padding, padding), (padding, padding)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


@pytest.mark.parametrize(
  "kernel_size,stride,cin,cout,size",
  [
    (1, 1, 16, 24, (9, 12)),  # matmul path
    (1, 2, 16, 24, (9, 12)),  # strided 1x1 (projection shortcut)
    (3, 1, 8, 16, (10, 7)),  # im2col weight gradient (few input channels)
    (3, 2, 64, 32, (11, 14)),  # per-tap weight gradient, stride 2, odd sizes
    (3, 1, 64, 48, (9, 13)),  # one GEMM over row- and column-shifted copies, stride 1
    (5, 1, 64, 16, (8, 11)),  # the same with 2 rows of padding
    (7, 2, 3, 16, (20, 18)),  # the ResNet stem
  ],
)
def test_conv2d_matches_xla_convolution(kernel_size, stride, cin, cout, size):
  assert jax.default_backend() == "cpu"  # the tuned paths are the CPU ones
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *size, cin)).astype(np.float32)
  k = (0.1 * rng.standard_normal((kernel_size, kernel_size, cin, cout))).astype(np.float32)
  pad = kernel_size // 2
  ours = jax.jit(lambda x, k: conv2d(x, k, stride, pad))
  ref = jax.jit(lambda x, k: _reference_conv(x, k, stride, pad))
  np.testing.assert_allclose(ours(x, k), ref(x, k), rtol=1e-5, atol=1e-5)
  cot = rng.standard_normal(ref(x, k).shape).astype(np.float32)
  grad = lambda f: jax.vjp(f, x, k)[1](cot)
  (dx, dk), (rdx, rdk) = grad(ours), grad(ref)
  np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dk, rdk, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("size", [(9, 12), (16, 16)])
def test_max_pool_matches_torch(ties, size):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, *size, 5)).astype(np.float32)
  if ties:
    # Few distinct values (and zeros, as after a ReLU): most windows hold tied maxima, and
    # PyTorch gives each output's gradient to the first of them in row-major order.
    x = np.maximum(np.round(x), 0.0).astype(np.float32)
  out, vjp = jax.vjp(lambda x: max_pool2d(x, 3, 2, 1), x)
  cot = rng.standard_normal(out.shape).astype(np.float32)
  (dx,) = jax.jit(vjp)(cot)
  xt = torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy()).requires_grad_(True)
  yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
  (dxt,) = torch.autograd.grad(yt, xt, torch.from_numpy(np.transpose(cot, (0, 3, 1, 2)).copy()))
  np.testing.assert_allclose(out, np.transpose(yt.detach().numpy(), (0, 2, 3, 1)), atol=0)
  np.testing.assert_allclose(dx, np.transpose(dxt.numpy(), (0, 2, 3, 1)), rtol=1e-6, atol=1e-6)


def test_conv_dtype_bfloat16():
  x = jnp.ones((1, 8, 8, 4), jnp.bfloat16)
  k = jnp.ones((3, 3, 4, 2), jnp.bfloat16)
  assert conv2d(x, k, 1, 1).dtype == jnp.bfloat16
  assert conv2d(x, k[:1, :1], 1, 0).dtype == jnp.bfloat16
