"""Multi-scale deformable attention and bilinear sampling vs their PyTorch references."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mpformer_jax.ops import msda as msda_lib
from mpformer_jax.ops.msda import multi_scale_deformable_attention
from mpformer_jax.ops.sampling import point_sample, resize_bilinear, resize_bilinear_hw


def ms_deform_attn_core_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights):
  """Deformable-DETR's reference implementation (kept verbatim apart from formatting)."""
  N_, S_, M_, D_ = value.shape
  _, Lq_, M_, L_, P_, _ = sampling_locations.shape
  value_list = value.split([H_ * W_ for H_, W_ in value_spatial_shapes], dim=1)
  sampling_grids = 2 * sampling_locations - 1
  sampling_value_list = []
  for lid_, (H_, W_) in enumerate(value_spatial_shapes):
    value_l_ = value_list[lid_].flatten(2).transpose(1, 2).reshape(N_ * M_, D_, H_, W_)
    sampling_grid_l_ = sampling_grids[:, :, :, lid_].transpose(1, 2).flatten(0, 1)
    sampling_value_l_ = F.grid_sample(
      value_l_, sampling_grid_l_, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    sampling_value_list.append(sampling_value_l_)
  attention_weights = attention_weights.transpose(1, 2).reshape(N_ * M_, 1, Lq_, L_ * P_)
  output = (
    (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights)
    .sum(-1)
    .view(N_, M_ * D_, Lq_)
  )
  return output.transpose(1, 2).contiguous()


def _msda(spatial_shapes):
  """`(value, loc, attn) -> output` for fixed spatial shapes."""
  return lambda value, loc, attn: multi_scale_deformable_attention(value, spatial_shapes, loc, attn)


def _msda_sum(spatial_shapes):
  """Scalar float32 sum of the output (for jax.grad)."""
  return lambda *args: jnp.sum(_msda(spatial_shapes)(*args).astype(jnp.float32))


# (spatial_shapes, batch, queries, heads, channels, points)
CASES = [
  pytest.param(((7, 9),), 2, 5, 2, 3, 2, id="1-level"),
  pytest.param(((7, 9), (4, 5), (2, 3)), 1, 6, 3, 4, 3, id="3-levels"),
  pytest.param(((7, 9), (4, 5), (2, 3), (1, 1)), 2, 7, 2, 5, 4, id="4-levels-with-1x1"),
]


def _inputs(spatial_shapes, batch, queries, heads, channels, points, seed, special=False):
  rng = np.random.default_rng(seed)
  length = sum(h * w for h, w in spatial_shapes)
  levels = len(spatial_shapes)
  value = rng.standard_normal((batch, length, heads, channels)).astype(np.float32)
  loc = rng.uniform(-0.3, 1.3, (batch, queries, heads, levels, points, 2)).astype(np.float32)
  attn = rng.uniform(0, 1, (batch, queries, heads, levels, points)).astype(np.float32)
  if special:
    # Exact borders, pixel centres, pixel edges and far-away points, on random entries.
    flat = loc.reshape(-1, levels, points, 2)
    sizes = np.array([[w, h] for h, w in spatial_shapes], np.float32)[:, None, :]  # (x, y)
    n = flat.shape[0]
    pick = rng.integers(0, 2**31, flat.shape[:-1] + (2,))
    cell = pick % sizes.astype(np.int64)
    centres = (cell + 0.5) / sizes
    edges = cell / sizes
    specials = [
      np.zeros_like(flat),
      np.ones_like(flat),
      np.broadcast_to(centres, flat.shape),
      np.broadcast_to(edges, flat.shape),
      np.full_like(flat, -3.0),
      np.full_like(flat, 5.0),
      np.broadcast_to(np.array([-0.5, 1.5], np.float32), flat.shape),
    ]
    choice = rng.integers(0, len(specials) + 1, (n, levels, points, 1))
    for i, sp in enumerate(specials):
      flat = np.where(choice == i, sp, flat)
    loc = flat.reshape(loc.shape).astype(np.float32)
  return value, loc, attn


def _torch_forward_and_grads(spatial_shapes, value, loc, attn, cotangent):
  tensors = [torch.tensor(a, requires_grad=True) for a in (value, loc, attn)]
  out = ms_deform_attn_core_pytorch(tensors[0], spatial_shapes, tensors[1], tensors[2])
  grads = torch.autograd.grad(out, tensors, grad_outputs=torch.tensor(cotangent))
  return out.detach().numpy(), [g.numpy() for g in grads]


@pytest.mark.parametrize(
  ("spatial_shapes", "batch", "queries", "heads", "channels", "points"), CASES
)
def test_forward_matches_torch(spatial_shapes, batch, queries, heads, channels, points):
  value, loc, attn = _inputs(
    spatial_shapes, batch, queries, heads, channels, points, seed=0, special=True
  )
  expected = ms_deform_attn_core_pytorch(
    torch.tensor(value), spatial_shapes, torch.tensor(loc), torch.tensor(attn)
  ).numpy()
  out = jax.jit(multi_scale_deformable_attention, static_argnums=(1,))(
    value, spatial_shapes, loc, attn
  )
  assert out.shape == (batch, queries, heads * channels)
  assert out.dtype == jnp.float32
  err = float(np.max(np.abs(np.asarray(out) - expected)))
  assert err < 1e-5, err


@pytest.mark.parametrize(
  ("spatial_shapes", "batch", "queries", "heads", "channels", "points"), CASES
)
def test_gradients_match_torch(spatial_shapes, batch, queries, heads, channels, points):
  # Random (hence non-integer pixel) locations: torch's location gradient is discontinuous
  # exactly at integer pixel positions.
  value, loc, attn = _inputs(spatial_shapes, batch, queries, heads, channels, points, seed=1)
  cotangent = (
    np.random.default_rng(2).standard_normal((batch, queries, heads * channels)).astype(np.float32)
  )
  expected_out, expected_grads = _torch_forward_and_grads(
    spatial_shapes, value, loc, attn, cotangent
  )

  @jax.jit
  def forward_backward(value, loc, attn, cotangent):
    out, vjp = jax.vjp(_msda(spatial_shapes), value, loc, attn)
    return out, vjp(cotangent)

  out, grads = forward_backward(value, loc, attn, cotangent)
  np.testing.assert_allclose(np.asarray(out), expected_out, rtol=0, atol=1e-5)
  for name, got, want in zip(("value", "loc", "attn"), grads, expected_grads, strict=True):
    assert got.shape == want.shape and got.dtype == jnp.float32, name
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * scale, err_msg=name)
  # The location gradient must be non-trivial for the check to mean anything.
  assert np.max(np.abs(expected_grads[1])) > 0.1


def test_out_of_map_samples_give_zero_and_zero_gradients():
  spatial_shapes = ((4, 5), (2, 3))
  value, loc, attn = _inputs(spatial_shapes, 1, 3, 2, 3, 2, seed=3)
  loc = np.where(np.arange(2) == 0, -2.0, 3.0).astype(np.float32) * np.ones_like(loc)

  out = multi_scale_deformable_attention(value, spatial_shapes, loc, attn)
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  grads = jax.grad(_msda_sum(spatial_shapes), argnums=(0, 1, 2))(value, loc, attn)
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_bfloat16_close_to_float32():
  spatial_shapes = ((7, 9), (4, 5), (2, 3))
  value, loc, attn = _inputs(spatial_shapes, 2, 6, 2, 8, 3, seed=4)
  attn /= attn.sum(axis=(-1, -2), keepdims=True)
  v16, l16, a16 = (jnp.asarray(x, jnp.bfloat16) for x in (value, loc, attn))
  out16 = multi_scale_deformable_attention(v16, spatial_shapes, l16, a16)
  assert out16.dtype == jnp.bfloat16
  # Reference: float32 computation on the same (bf16-rounded) inputs; the only extra error is
  # the final rounding to bf16, as accumulation is float32.
  ref = _msda(spatial_shapes)(*(x.astype(jnp.float32) for x in (v16, l16, a16)))
  np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(ref), rtol=1e-2, atol=1e-2)
  # And loosely close to the unrounded float32 inputs.
  full = multi_scale_deformable_attention(value, spatial_shapes, loc, attn)
  np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(full), rtol=0.1, atol=0.1)
  grads = jax.grad(_msda_sum(spatial_shapes), argnums=(0, 1, 2))(v16, l16, a16)
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  grads32 = jax.grad(_msda_sum(spatial_shapes), argnums=(0, 1, 2))(value, loc, attn)
  for g16, g32 in zip(grads, grads32, strict=True):
    scale = float(jnp.max(jnp.abs(g32)))
    np.testing.assert_allclose(np.asarray(g16, np.float32), g32, rtol=0.1, atol=0.05 * scale)


def test_vmap_and_jit_grad():
  spatial_shapes = ((4, 5), (2, 3))
  value, loc, attn = _inputs(spatial_shapes, 3, 4, 2, 3, 2, seed=5)
  single = _msda(spatial_shapes)

  def one_example(value, loc, attn):  # Unbatched inputs, vmapped below.
    return single(value[None], loc[None], attn[None])[0]

  batched = jax.vmap(one_example)(value, loc, attn)
  looped = np.stack([one_example(value[i], loc[i], attn[i]) for i in range(3)])
  np.testing.assert_allclose(np.asarray(batched), looped, rtol=1e-6, atol=1e-6)

  def loss(value, loc, attn):
    return jnp.sum(jax.vmap(one_example)(value, loc, attn) ** 2)

  g_jit = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(value, loc, attn)
  g_ref = jax.grad(lambda *args: jnp.sum(single(*args) ** 2), argnums=(0, 1, 2))(value, loc, attn)
  for got, want in zip(g_jit, g_ref, strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_batch_sharding_needs_no_communication():
  # Data parallelism: with the batch sharded over the 8 (fake) devices, forward and backward
  # must stay device-local (flat indices across the batch made XLA all-gather `value`).
  spatial_shapes = ((4, 5), (2, 3))
  value, loc, attn = _inputs(spatial_shapes, 8, 6, 2, 3, 2, seed=11)
  cotangent = np.random.default_rng(12).standard_normal((8, 6, 6)).astype(np.float32)
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
  args = [jax.device_put(x, sharding) for x in (value, loc, attn, cotangent)]

  @jax.jit
  def forward_backward(value, loc, attn, cotangent):
    out, vjp = jax.vjp(_msda(spatial_shapes), value, loc, attn)
    return out, vjp(cotangent)

  hlo = forward_backward.lower(*args).compile().as_text()
  for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
    assert collective not in hlo, collective
  out, grads = forward_backward(*args)
  assert out.sharding.spec == PartitionSpec("data")
  assert grads[0].sharding.spec == PartitionSpec("data")
  out_ref, grads_ref = forward_backward(value, loc, attn, cotangent)
  np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), rtol=1e-6, atol=1e-6)
  for got, want in zip(grads, grads_ref, strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_dispatch(monkeypatch):
  spatial_shapes = ((4, 5), (2, 3))
  value, loc, attn = _inputs(spatial_shapes, 1, 3, 2, 3, 2, seed=6)
  default = multi_scale_deformable_attention(value, spatial_shapes, loc, attn)
  xla = multi_scale_deformable_attention(value, spatial_shapes, loc, attn, "xla")
  interp = multi_scale_deformable_attention(
    value, spatial_shapes, loc, attn, implementation="xla", interpret=True
  )
  np.testing.assert_array_equal(np.asarray(default), np.asarray(xla))
  np.testing.assert_array_equal(np.asarray(interp), np.asarray(xla))
  assert msda_lib.default_implementation() == "xla"
  # The kernels are opt-in until they have run on their hardware.
  assert msda_lib.default_implementation("gpu") == "xla"
  assert msda_lib.default_implementation("tpu") == "xla"
  assert msda_lib.available_implementations() == ("xla", "pallas_gpu", "pallas_tpu")
  for name in ("pallas_gpu", "pallas_tpu"):  # each dispatches to its own kernel
    module = importlib.import_module(f"mpformer_jax.ops.msda_{name}")
    function = f"multi_scale_deformable_attention_{name}"
    kernel, calls = getattr(module, function), []

    def spy(*args, kernel=kernel, calls=calls, **kwargs):
      calls.append(kwargs)
      return kernel(*args, **kwargs)

    monkeypatch.setattr(module, function, spy)
    out = multi_scale_deformable_attention(value, spatial_shapes, loc, attn, name, interpret=True)
    assert calls == [{"interpret": True}]
    np.testing.assert_allclose(np.asarray(out), np.asarray(xla), rtol=1e-5, atol=1e-6)
  with pytest.raises(NotImplementedError, match="not available yet"):
    monkeypatch.setitem(msda_lib.IMPLEMENTATIONS, "pallas_tpu", msda_lib.Implementation(None))
    multi_scale_deformable_attention(value, spatial_shapes, loc, attn, "pallas_tpu")
  with pytest.raises(ValueError, match="cuda_kernel"):
    multi_scale_deformable_attention(value, spatial_shapes, loc, attn, "cuda_kernel")
  with pytest.raises(ValueError, match="spatial_shapes"):
    multi_scale_deformable_attention(value, ((4, 5),), loc[:, :, :, :1], attn[:, :, :, :1])


def test_registering_an_implementation_is_one_entry(monkeypatch):
  calls = []

  def fake_kernel(value, spatial_shapes, loc, attn, *, interpret):
    calls.append(interpret)
    return msda_lib.multi_scale_deformable_attention_xla(value, spatial_shapes, loc, attn)

  monkeypatch.setitem(
    msda_lib.IMPLEMENTATIONS, "pallas_gpu", msda_lib.Implementation(fake_kernel, ("cpu",))
  )
  spatial_shapes = ((2, 3),)
  value, loc, attn = _inputs(spatial_shapes, 1, 2, 1, 2, 1, seed=7)
  assert msda_lib.default_implementation() == "pallas_gpu"
  multi_scale_deformable_attention(value, spatial_shapes, loc, attn, interpret=True)
  assert calls == [True]


# ------------------------------------------------------------------------------------------------
# point_sample and resize_bilinear
# ------------------------------------------------------------------------------------------------


def _torch_point_sample(features_nhwc, coords):
  x = features_nhwc.permute(0, 3, 1, 2)
  out = F.grid_sample(
    x, 2 * coords[:, :, None, :] - 1, mode="bilinear", padding_mode="zeros", align_corners=False
  )
  return out[..., 0].permute(0, 2, 1)  # [B, P, C]


def test_point_sample_matches_torch():
  rng = np.random.default_rng(8)
  features = rng.standard_normal((2, 7, 9, 5)).astype(np.float32)
  coords = rng.uniform(-0.3, 1.3, (2, 40, 2)).astype(np.float32)
  # A few exact borders / far-away points (forward only: gradients are checked on `coords`).
  special = coords.copy()
  special[:, :4] = np.array([[0, 0], [1, 1], [-2, 0.5], [0.5, 3]], np.float32)
  expected = _torch_point_sample(torch.tensor(features), torch.tensor(special)).numpy()
  out = jax.jit(point_sample)(features, special)
  assert out.shape == (2, 40, 5)
  assert float(np.max(np.abs(np.asarray(out) - expected))) < 1e-5

  f_t, c_t = torch.tensor(features, requires_grad=True), torch.tensor(coords, requires_grad=True)
  cotangent = rng.standard_normal((2, 40, 5)).astype(np.float32)
  t_out = _torch_point_sample(f_t, c_t)
  want = torch.autograd.grad(t_out, (f_t, c_t), grad_outputs=torch.tensor(cotangent))
  _, vjp = jax.vjp(point_sample, jnp.asarray(features), jnp.asarray(coords))
  got = vjp(jnp.asarray(cotangent))
  for name, g, w in zip(("features", "coords"), got, want, strict=True):
    scale = max(1.0, float(w.abs().max()))
    np.testing.assert_allclose(np.asarray(g), w.numpy(), rtol=1e-4, atol=1e-4 * scale, err_msg=name)

  bf16 = point_sample(jnp.asarray(features, jnp.bfloat16), jnp.asarray(coords))
  assert bf16.dtype == jnp.bfloat16


RESIZES = [
  ((7, 9), (13, 5)),  # up in H, down in W
  ((16, 16), (64, 64)),  # 4x up
  ((64, 48), (17, 23)),  # non-integer down, where float32 rounding of the taps matters
  ((5, 5), (5, 11)),  # identity in H
  ((100, 3), (7, 1)),  # strong down
  ((1, 1), (4, 4)),
  ((33, 31), (128, 96)),
]


@pytest.mark.parametrize(("in_size", "out_size"), RESIZES)
def test_resize_bilinear_matches_torch(in_size, out_size):
  rng = np.random.default_rng(9)
  x = rng.standard_normal((2, 3, *in_size)).astype(np.float32)
  expected = F.interpolate(
    torch.tensor(x), size=out_size, mode="bilinear", align_corners=False
  ).numpy()
  hw = resize_bilinear_hw(x, out_size)
  nhwc = resize_bilinear(x.transpose(0, 2, 3, 1), out_size)
  assert hw.shape == expected.shape and nhwc.shape == (2, *out_size, 3)
  np.testing.assert_allclose(np.asarray(hw), expected, rtol=0, atol=2e-6)
  np.testing.assert_allclose(np.asarray(nhwc).transpose(0, 3, 1, 2), expected, rtol=0, atol=2e-6)


def test_resize_bilinear_dtype_and_jit():
  x = jnp.asarray(np.random.default_rng(10).standard_normal((1, 2, 9, 7)), jnp.bfloat16)
  out = jax.jit(resize_bilinear_hw, static_argnums=1)(x, (5, 12))
  assert out.dtype == jnp.bfloat16 and out.shape == (1, 2, 5, 12)
  g = jax.grad(lambda x: jnp.sum(resize_bilinear_hw(x, (5, 12)).astype(jnp.float32)))(x)
  assert g.shape == x.shape
