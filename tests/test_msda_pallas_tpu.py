"""The Pallas Mosaic TPU MSDA kernel (TPU interpret mode on CPU) vs the XLA implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpformer_jax.ops import msda_pallas_tpu
from mpformer_jax.ops.msda import multi_scale_deformable_attention_xla
from mpformer_jax.ops.msda_pallas_tpu import multi_scale_deformable_attention_pallas_tpu

# TPU interpret mode runs every grid step through a simulated TPU, so the shapes are tiny;
# block_s=128 (the smallest tile) makes the 12x13 level (156 positions) span two tiles.
BLOCK_S = 128

# (spatial_shapes, batch, queries, heads, channels, points, dtype, chunked)
CASES = [
  # `chunked`: a tiny SMEM table budget splits the batch of 2 into two kernel calls.
  pytest.param((((3, 5),), 2, 9, 2, 4, 3, jnp.float32, True), id="1-level-f32-chunked"),
  # 130 queries: two query blocks, the second one mostly padding; a level of two tiles.
  pytest.param((((12, 13), (7, 2)), 1, 130, 2, 4, 2, jnp.float32, False), id="2-levels-tiled-f32"),
  pytest.param(
    (((12, 13), (3, 5), (7, 2), (1, 1)), 1, 7, 2, 3, 2, jnp.float32, False), id="4-levels-f32"
  ),
  pytest.param((((12, 13), (3, 5)), 2, 6, 2, 4, 2, jnp.bfloat16, False), id="2-levels-bf16"),
]
CASE_ARGS = (
  "spatial_shapes",
  "batch",
  "queries",
  "heads",
  "channels",
  "points",
  "dtype",
  "chunked",
)


def _inputs(spatial_shapes, batch, queries, heads, channels, points, dtype, seed=0):
  rng = np.random.default_rng(seed)
  length = sum(h * w for h, w in spatial_shapes)
  levels = len(spatial_shapes)
  value = rng.standard_normal((batch, length, heads, channels))
  # Random (hence non-integer pixel) locations, partly outside [0, 1]: corners in the zero
  # padding. The location gradient is discontinuous at integer pixel positions.
  loc = rng.uniform(-0.3, 1.3, (batch, queries, heads, levels, points, 2))
  loc[rng.uniform(size=loc.shape[:-1]) < 0.1] = (-2.0, 3.0)  # samples far outside the map
  loc[:, 0] = -2.0  # query 0 samples nothing but padding: its output must be exactly 0
  attn = rng.uniform(0, 1, (batch, queries, heads, levels, points))
  cotangent = rng.standard_normal((batch, queries, heads * channels))
  return tuple(jnp.asarray(x, dtype) for x in (value, loc, attn, cotangent))


def _forward_backward(fn, spatial_shapes):
  @jax.jit
  def run(value, loc, attn, cotangent):
    out, vjp = jax.vjp(lambda *args: fn(args[0], spatial_shapes, *args[1:]), value, loc, attn)
    return out, vjp(cotangent)

  return run


@pytest.fixture(scope="module", params=CASES)
def case(request):
  """Inputs and (out, grads) of the kernel and of the XLA implementation, under jit."""
  spatial_shapes, batch, queries, heads, channels, points, dtype, chunked = request.param
  inputs = _inputs(spatial_shapes, batch, queries, heads, channels, points, dtype)
  kernel = lambda *args: multi_scale_deformable_attention_pallas_tpu(
    *args, interpret=True, block_s=BLOCK_S
  )
  with pytest.MonkeyPatch.context() as mp:
    if chunked:  # one example per kernel call
      mp.setattr(msda_pallas_tpu, "_MAX_RANGE_ENTRIES", 1)
    got = _forward_backward(kernel, spatial_shapes)(*inputs)
  want = _forward_backward(multi_scale_deformable_attention_xla, spatial_shapes)(*inputs)
  return dict(zip(CASE_ARGS, request.param, strict=True)), inputs, got, want


def _tolerance(dtype, want):
  # float32: 1e-5 relative to the largest entry (the kernel sums in another order, through
  # float32 MXU matmuls). bfloat16: outputs and gradients are rounded to bfloat16 (2^-8).
  rel = 1e-5 if dtype == jnp.float32 else 2e-2
  return dict(rtol=rel, atol=rel * max(1.0, float(np.max(np.abs(want)))))


def test_forward_matches_xla(case):
  params, _, (out, _), (want, _) = case
  batch, queries, heads, channels = (params[k] for k in ("batch", "queries", "heads", "channels"))
  assert out.shape == (batch, queries, heads * channels)
  assert out.dtype == params["dtype"]
  want = np.asarray(want, np.float32)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, **_tolerance(params["dtype"], want))
  np.testing.assert_array_equal(np.asarray(out[:, 0], np.float32), 0.0)
  assert np.max(np.abs(want)) > 0.1  # the comparison is not between zeros


@pytest.mark.parametrize("index", [0, 1, 2], ids=["value", "locations", "attention_weights"])
def test_gradients_match_xla(case, index):
  params, inputs, (_, grads), (_, want_grads) = case
  got, want = grads[index], np.asarray(want_grads[index], np.float32)
  assert got.shape == inputs[index].shape and got.dtype == inputs[index].dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), want, **_tolerance(params["dtype"], want))
  assert np.max(np.abs(want)) > 0.1
  if index > 0:  # samples entirely outside the map have zero location / attention gradients
    np.testing.assert_array_equal(np.asarray(got[:, 0], np.float32), 0.0)


def test_tile_ranges_cover_every_touched_tile():
  """The (first, last) tile of each query block contains all its corners and nothing more."""
  spatial_shapes, block_q, block_s = ((20, 13), (9, 7), (1, 1)), 128, 128
  cfg = msda_pallas_tpu._Config(spatial_shapes, block_q, block_s, interpret=True)
  batch, queries, heads, points = 2, 200, 3, 2
  rng = np.random.default_rng(0)
  # Queries sampling near a query-dependent point (as in the pixel decoder), plus some spread.
  centre = np.linspace(0.05, 0.95, queries)[None, :, None, None, None, None]
  loc = centre + rng.normal(0, 0.05, (batch, queries, heads, 3, points, 2))
  loc[0, :, 0] = rng.uniform(-0.5, 1.5, (queries, 3, points, 2))  # spread: (b, h) = (0, 0)

  @jax.jit
  def prepare(loc):
    prep = msda_pallas_tpu._prepare(cfg, loc, jnp.ones(loc.shape[:-1]))
    return prep.idx, prep.ranges, prep.q_ranges

  idx, ranges, q_ranges = (np.asarray(x) for x in prepare(jnp.asarray(loc, jnp.float32)))
  q_ranges = q_ranges.reshape(batch, heads, cfg.num_tiles, 2)
  ranges = ranges.reshape(batch, heads, 2, 3, 2)  # [B, heads, nQ, L, 2]; idx [B, heads, L, 4P, Q]
  first_tile = np.array(cfg.level_first_tile)
  touched = np.zeros((batch, heads, 2, cfg.num_tiles), bool)  # [B, heads, nQ, T]
  for b, h, qi, lvl in np.ndindex(batch, heads, 2, 3):
    block = idx[b, h, lvl, :, qi * block_q : (qi + 1) * block_q]
    tiles = set((first_tile[lvl] + block[block >= 0] // block_s).tolist())
    first, last = ranges[b, h, qi, lvl]
    if tiles:
      assert (first, last) == (min(tiles), max(tiles)), (b, h, qi, lvl)
      touched[b, h, qi, first : last + 1] = True
    else:
      assert first > last, (b, h, qi, lvl)
  assert not touched.all()  # the test data does let the kernels skip tiles
  # The transposed table: first and last query block whose range holds each tile.
  for b, h, t in np.ndindex(batch, heads, cfg.num_tiles):
    blocks = np.flatnonzero(touched[b, h, :, t])
    want = (blocks.min(), blocks.max()) if blocks.size else (1, 0)
    assert tuple(q_ranges[b, h, t]) == want, (b, h, t)
  assert (q_ranges[..., 0] > 0).any() or (q_ranges[..., 1] < 1).any()  # some blocks clamped


def test_lowers_for_tpu():
  """Pallas -> Mosaic lowering of the forward and both backward kernels (no TPU needed).

  Interpret mode does not check that Mosaic can express the kernel (e.g. gathers or unaligned
  blocks would fail only here); compiling the Mosaic module needs a TPU runtime (libtpu).
  """
  spatial_shapes = ((12, 13), (3, 5))
  args = [
    jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    for shape in [(2, 171, 4, 32), (2, 100, 4, 2, 4, 2), (2, 100, 4, 2, 4), (2, 100, 128)]
  ]
  lowered = (
    _forward_backward(multi_scale_deformable_attention_pallas_tpu, spatial_shapes)
    .trace(*args)
    .lower(lowering_platforms=("tpu",))
  )
  assert lowered.as_text().count("tpu_custom_call") == 3


def test_rejects_bad_block_sizes():
  value = jnp.zeros((1, 15, 1, 4))
  loc = jnp.zeros((1, 2, 1, 1, 1, 2))
  with pytest.raises(ValueError, match="multiples of 128"):
    multi_scale_deformable_attention_pallas_tpu(
      value, ((3, 5),), loc, loc[..., 0], interpret=True, block_q=64
    )


def test_bf16_matmul_keeps_float32_weights():
  """bf16 value times the float32 interpolation matrix is accurate to ~2^-16, not 2^-8.

  (The bf16 cases above cannot see this: their outputs are rounded to bf16 anyway.)
  """
  rng = np.random.default_rng(0)
  data = jnp.asarray(rng.standard_normal((8, 256)), jnp.bfloat16)
  weights = jnp.asarray(rng.uniform(0, 1, (256, 128)), jnp.float32)
  got = np.asarray(msda_pallas_tpu._weights_dot(data, weights, ((1,), (0,))))
  want = np.asarray(data, np.float64) @ np.asarray(weights, np.float64)
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert got.dtype == np.float32 and err < 1e-4, err
