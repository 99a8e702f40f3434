"""The Pallas GPU (Triton) MSDA kernels, run in interpret mode, vs the XLA implementation.

The XLA implementation is itself checked against Deformable-DETR's PyTorch reference in
test_msda.py. Interpret-mode kernels compile slowly on CPU (~1-2 s per forward + backward), so
there are few cases, each checking the forward and all three gradients at once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as plgpu

from mpformer_jax.ops import msda_pallas_gpu as kernel_lib
from mpformer_jax.ops.msda import multi_scale_deformable_attention_xla
from mpformer_jax.ops.msda_pallas_gpu import multi_scale_deformable_attention_pallas_gpu


def _inputs(spatial_shapes, batch, queries, heads, channels, points, seed, inside=False):
  """Random `(value, loc, attn, cotangent)` float32 numpy arrays.

  By default location coordinates are uniform in [-0.3, 1.3] (3 in 8 outside [0, 1]), and about
  1 in 4 samples is replaced by an exact pixel centre, an exact map border (0 or 1) or a point
  far outside (-2 or 3). With `inside=True` all 4 corners of every sample are inside the map.
  """
  rng = np.random.default_rng(seed)
  length = sum(h * w for h, w in spatial_shapes)
  levels = len(spatial_shapes)
  sizes = np.array([[w, h] for h, w in spatial_shapes], np.float32)[:, None, :]  # [L, 1, (x, y)]
  value = rng.standard_normal((batch, length, heads, channels)).astype(np.float32)
  shape = (batch, queries, heads, levels, points, 2)
  if inside:
    # Pixel coordinates in [0, size - 1), i.e. normalised [0.5 / size, (size - 0.5) / size).
    pixel = rng.uniform(0, 1, shape) * (sizes - 1) * 0.999
    loc = ((pixel + 0.5) / sizes).astype(np.float32)
  else:
    loc = rng.uniform(-0.3, 1.3, shape).astype(np.float32)
    cells = rng.integers(0, 1000, shape) % sizes.astype(np.int64)
    specials = [(cells + 0.5) / sizes, np.zeros(shape), np.ones(shape), np.full(shape, -2.0)]
    specials.append(np.full(shape, 3.0))
    choice = rng.integers(0, 4 * len(specials), shape[:-1] + (1,))  # ~1 in 4 special
    for i, special in enumerate(specials):
      loc = np.where(choice == i, special, loc).astype(np.float32)
  attn = rng.uniform(0, 1, shape[:-1]).astype(np.float32)
  cotangent = rng.standard_normal((batch, queries, heads * channels)).astype(np.float32)
  return value, loc, attn, cotangent


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward_and_grads(fn, spatial_shapes, value, loc, attn, cotangent):
  """`(output, (d_value, d_loc, d_attn))` of `fn` with the given output cotangent: `jax.grad`
  of `sum(output * cotangent)` under jit."""

  def loss(value, loc, attn):
    out = fn(value, spatial_shapes, loc, attn)
    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(value, loc, attn)
  return out, grads


def _assert_close(got, want, rtol, name):
  """Elementwise |got - want| <= rtol * (|want| + max |want|): relative to the tensor's scale."""
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  scale = float(np.max(np.abs(want)))
  # Every compared tensor must be non-trivial for the comparison to mean anything.
  assert scale > 0.1, (name, scale)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=name)


def _check_against_xla(spatial_shapes, inputs, kernel_fn, rtol):
  out, grads = _forward_and_grads(kernel_fn, spatial_shapes, *inputs)
  want_out, want_grads = _forward_and_grads(
    multi_scale_deformable_attention_xla, spatial_shapes, *inputs
  )
  dtype = inputs[0].dtype
  assert out.dtype == dtype and out.shape == want_out.shape
  _assert_close(out, want_out, rtol, "output")
  for name, got, want, x in zip(
    ("value", "loc", "attn"), grads, want_grads, inputs[:3], strict=True
  ):
    assert got.dtype == x.dtype, name
    _assert_close(got, want, rtol, f"d_{name}")


_interpret = functools.partial(multi_scale_deformable_attention_pallas_gpu, interpret=True)


# (spatial_shapes, batch, queries, heads, channels, points, block_q)
CASES = [
  # Q = 5 in one block of 8 (padded); odd level sizes.
  pytest.param(((3, 5),), 2, 5, 2, 4, 2, None, id="1-level"),
  # 3 blocks of 8 queries, the last with 3.
  pytest.param(((7, 2), (3, 5)), 1, 19, 3, 8, 3, 8, id="2-levels-3-blocks"),
  # C = 3 is zero-padded to 4; Q a multiple of the block; a 1x1 level (always clamped corners).
  pytest.param(((6, 7), (3, 5), (7, 2), (1, 1)), 2, 8, 2, 3, 2, 4, id="4-levels-odd-C"),
]


@pytest.mark.parametrize(
  ("spatial_shapes", "batch", "queries", "heads", "channels", "points", "block_q"), CASES
)
def test_float32_forward_and_gradients_match_xla(
  spatial_shapes, batch, queries, heads, channels, points, block_q
):
  inputs = _inputs(spatial_shapes, batch, queries, heads, channels, points, seed=0)
  loc = inputs[1]
  assert np.mean((loc < 0) | (loc > 1)) > 0.2  # many samples outside the map on either side
  fn = functools.partial(_interpret, block_q=block_q)
  _check_against_xla(spatial_shapes, inputs, fn, rtol=1e-5)


def test_bfloat16_matches_xla():
  spatial_shapes = ((7, 2), (3, 5))
  inputs = _inputs(spatial_shapes, 1, 19, 2, 8, 3, seed=1)
  inputs = tuple(jnp.asarray(x, jnp.bfloat16) for x in inputs)
  # Both accumulate in float32 from the same bf16 inputs, so they differ by the final bf16
  # rounding (and float32 summation order) only: a few bf16 ulps.
  _check_against_xla(spatial_shapes, inputs, functools.partial(_interpret, block_q=8), rtol=2e-2)


def test_gpu_atomics_in_interpret_mode():
  # The GPU's vectorised atomic_add (one [block_q, 4, C] call per sample) rather than the
  # row-by-row adds that interpret mode normally uses. Interpret mode discharges it into
  # `d[rows] = d[rows] + update`, which drops repeated rows within one call, so it is exact
  # only with one query per program (block_q=1) and 4 distinct in-map corners per sample.
  spatial_shapes = ((4, 5), (3, 2))
  inputs = _inputs(spatial_shapes, 2, 5, 2, 4, 2, seed=2, inside=True)
  fn = functools.partial(
    kernel_lib._msda_pallas_gpu, interpret=True, block_q=1, serial_atomics=False
  )
  _check_against_xla(spatial_shapes, inputs, fn, rtol=1e-5)


def test_eager_call_and_out_of_map_samples():
  spatial_shapes = ((3, 5), (2, 3))
  value, loc, attn, cotangent = _inputs(spatial_shapes, 2, 6, 2, 4, 2, seed=3)
  # Outside jit: pallas_call and the custom VJP run eagerly.
  want = multi_scale_deformable_attention_xla(value, spatial_shapes, loc, attn)
  _assert_close(_interpret(value, spatial_shapes, loc, attn), want, 1e-5, "eager output")

  # Every sample outside the map (on either side): zero output, zero gradients.
  loc = np.where(np.arange(2) == 0, -0.6, 1.6).astype(np.float32) * np.ones_like(loc)
  out, grads = _forward_and_grads(_interpret, spatial_shapes, value, loc, attn, cotangent)
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_rejects_bad_block_size():
  spatial_shapes = ((3, 5),)
  value, loc, attn, _ = _inputs(spatial_shapes, 1, 4, 1, 4, 1, seed=5)
  with pytest.raises(ValueError, match="power of two"):
    _interpret(value, spatial_shapes, loc, attn, block_q=3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_triton(dtype):
  # No GPU needed: jax lowers Pallas Triton kernels to Triton IR on any host. A Mask2Former-
  # sized head (C = 32), 4 levels, 4 points, and a Q that is not a multiple of the block.
  spatial_shapes = ((16, 16), (8, 8), (4, 4), (2, 2))
  batch, queries, heads, channels, points = 2, 340, 8, 32, 4
  length = sum(h * w for h, w in spatial_shapes)
  padded_q = 352  # 11 blocks of 32, the default for C = 32
  value = jax.ShapeDtypeStruct((batch, length, heads, channels), dtype)
  loc = jax.ShapeDtypeStruct((batch, queries, heads, 4, points, 2), dtype)
  attn = jax.ShapeDtypeStruct((batch, queries, heads, 4, points), dtype)
  config = kernel_lib._Config(spatial_shapes, 32, interpret=False, serial_atomics=False)
  padded = lambda x: jax.ShapeDtypeStruct((batch, padded_q, *x.shape[2:]), dtype)
  ct = jax.ShapeDtypeStruct((batch, padded_q, heads, channels), dtype)
  lowerings = {
    # The public function (padding included) and, separately, the backward kernel: lowering
    # stops at the first kernel when it fails (see below).
    "forward": (
      lambda v, loc, a: multi_scale_deformable_attention_pallas_gpu(v, spatial_shapes, loc, a),
      (value, loc, attn),
    ),
    "backward": (
      functools.partial(kernel_lib._backward_call, config),
      (value, padded(loc), padded(attn), ct),
    ),
  }
  for name, (fn, args) in lowerings.items():
    try:
      hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:
      # Newer jaxlibs compile the Triton IR to PTX while lowering, which needs the CUDA plugin;
      # getting that far means the kernel did lower to Triton IR.
      if "Triton compilation handler" not in str(e):
        raise
      continue
    target = getattr(plgpu, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
    assert hlo.count(target) == 1, name
