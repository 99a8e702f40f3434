"""ResNet backbone: parity with torchvision-layout and Hugging Face ResNets, converters, norms."""

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from mpformer_jax.convert.common import ConversionError, StateDictReader, to_numpy_state_dict
from mpformer_jax.convert.torchvision_resnet import (
  convert_hf_resnet,
  convert_torchvision_resnet,
  resnet_variable_shapes,
)
from mpformer_jax.models.norms import FrozenBatchNorm, make_norm
from mpformer_jax.models.resnet import ResNet

OUT_NAMES = ("res2", "res3", "res4", "res5")

# Compiling dominates these tests on 2 CPU cores. Cheaper LLVM optimisation roughly halves it
# (the numerics under test are the model's, not XLA's optimisations).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# One jitted eval-mode forward with the (hashable) module static, so tests that run the same
# architecture on the same input shape share a compilation.
_apply = jax.jit(
  lambda model, variables, x: model.apply(variables, x),
  static_argnums=0,
  compiler_options=_FAST_COMPILE,
)


# --- A plain-torch ResNet with torchvision's module layout and parameter names. ---------------


class _TorchBottleneck(tnn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride, downsample):
    super().__init__()
    self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(planes * 4)
    self.relu = tnn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


class _TorchResNet(tnn.Module):
  """torchvision.models.ResNet (Bottleneck) with configurable widths; returns layer1..4."""

  def __init__(self, depths, stem_width, width, num_classes=10):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
    self.bn1 = tnn.BatchNorm2d(stem_width)
    self.relu = tnn.ReLU()
    self.maxpool = tnn.MaxPool2d(3, stride=2, padding=1)
    inplanes = stem_width
    for i, depth in enumerate(depths):
      planes = width * 2**i
      stride = 1 if i == 0 else 2
      blocks = []
      for j in range(depth):
        s = stride if j == 0 else 1
        downsample = None
        if s != 1 or inplanes != planes * 4:
          downsample = tnn.Sequential(
            tnn.Conv2d(inplanes, planes * 4, 1, stride=s, bias=False), tnn.BatchNorm2d(planes * 4)
          )
        blocks.append(_TorchBottleneck(inplanes, planes, s, downsample))
        inplanes = planes * 4
      setattr(self, f"layer{i + 1}", tnn.Sequential(*blocks))
    self.avgpool = tnn.AdaptiveAvgPool2d(1)
    self.fc = tnn.Linear(inplanes, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    outs = {}
    for i, name in enumerate(OUT_NAMES):
      x = getattr(self, f"layer{i + 1}")(x)
      outs[name] = x
    return outs


def _randomise(model: tnn.Module, seed: int):
  """Random conv weights and random BN affine + running statistics (eval-mode BN is not identity).

  Convs use torchvision's kaiming-normal fan_out init so activations keep a sane scale with depth.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, tnn.Conv2d):
        fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_out) ** 0.5)
      elif isinstance(m, tnn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=g))
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
        m.num_batches_tracked.fill_(7)
  model.eval()
  return model


def _images(batch, h, w, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, 3, h, w)).astype(np.float32)


def _random_variables(model: ResNet, seed: int) -> dict:
  """Random variables for `model` without `model.init` (threefry init compiles slowly on CPU).

  Kernels follow torchvision's kaiming-normal fan_out scale; norms get random affine and
  statistics.
  """
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_out = leaf.shape[0] * leaf.shape[1] * leaf.shape[3]
      value = rng.standard_normal(leaf.shape) * (2.0 / fan_out) ** 0.5
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = 0.2 * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _compare(ours: dict, ref: dict, label: str, tol: float = 1e-4):
  """Max abs error per output, relative to the reference's magnitude when that exceeds 1."""
  for name in OUT_NAMES:
    want = ref[name].detach().numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC
    got = np.asarray(ours[name])
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = float(np.max(np.abs(got - want)))
    scale = max(1.0, float(np.max(np.abs(want))))
    print(f"{label} {name}: shape {got.shape} max|ref| {scale:.3g} max abs err {err:.3g}")
    assert err / scale < tol, (name, err, scale)


# --- 1. torchvision-layout parity. -----------------------------------------------------------


@pytest.mark.parametrize(
  "stem_width,width,norm,size",
  [
    (16, 8, "frozen_bn", (64, 96)),
    # BatchNorm in eval mode (running statistics, affine in params); stem == 4 * width, so
    # stage 1 block 0 has no projection shortcut; sizes that are not multiples of 32.
    (32, 8, "bn", (66, 94)),
  ],
)
def test_torchvision_parity_small(stem_width, width, norm, size):
  depths = (1, 2, 1, 1)
  torch_model = _randomise(_TorchResNet(depths, stem_width, width), seed=1)
  sd = to_numpy_state_dict(torch_model.state_dict())
  assert ("layer1.0.downsample.0.weight" in sd) == (stem_width != 4 * width)

  variables = convert_torchvision_resnet(sd, norm=norm)  # depths inferred from the keys
  model = ResNet(depths=depths, stem_width=stem_width, width=width, norm=norm)
  h, w = size
  x = _images(2, h, w)
  ours = _apply(model, variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(x))
  _compare(ours, ref, f"torchvision small {norm} stem{stem_width} {h}x{w}")
  for name, stride in zip(OUT_NAMES, (4, 8, 16, 32), strict=True):
    assert ours[name].shape[1:3] == (-(-h // stride), -(-w // stride))  # ceil, like torch


def test_torchvision_parity_resnet50_layout():
  depths = (3, 4, 6, 3)
  torch_model = _randomise(_TorchResNet(depths, 64, 64, num_classes=1000), seed=2)
  sd = to_numpy_state_dict(torch_model.state_dict())
  variables = convert_torchvision_resnet(sd, depths=depths)
  model = ResNet()  # defaults are ResNet-50
  assert model.out_channels == {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
  x = _images(2, 64, 96, seed=3)
  ours = _apply(model, variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(x))
  _compare(ours, ref, "torchvision R50")


# --- 2. Hugging Face ResNetBackbone parity. ---------------------------------------------------


def test_hf_resnet_backbone_parity():
  transformers = pytest.importorskip("transformers")
  depths = (1, 2, 1, 1)
  width, stem_width = 8, 16
  config = transformers.ResNetConfig(
    embedding_size=stem_width,
    hidden_sizes=[4 * width * 2**i for i in range(4)],
    depths=list(depths),
    layer_type="bottleneck",
    out_features=["stage1", "stage2", "stage3", "stage4"],
  )
  torch.manual_seed(0)
  hf = _randomise(transformers.ResNetBackbone(config), seed=4)
  sd = to_numpy_state_dict(hf.state_dict())

  reader = StateDictReader(sd)
  variables = convert_hf_resnet(reader, "", depths, "frozen_bn")
  expected = resnet_variable_shapes(depths, stem_width, width, "frozen_bn")
  variables = reader.finish(variables, expected)

  model = ResNet(depths=depths, stem_width=stem_width, width=width)
  x = _images(2, 64, 96, seed=5)
  ours = _apply(model, variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  with torch.no_grad():
    maps = hf(torch.from_numpy(x)).feature_maps
  _compare(ours, dict(zip(OUT_NAMES, maps, strict=True)), "HF ResNetBackbone")

  # With a prefix (as inside a Mask2Former checkpoint) and inferred depths.
  prefix = "model.pixel_level_module.encoder."
  reader = StateDictReader({prefix + k: v for k, v in sd.items()})
  prefixed = reader.finish(convert_hf_resnet(reader, prefix, None, "frozen_bn"), expected)
  same = jax.tree.map(np.array_equal, prefixed, variables)
  assert all(jax.tree.leaves(same))


# --- 3. Converter errors. ---------------------------------------------------------------------


def test_converter_reports_all_problems_at_once():
  depths = (1, 2, 1, 1)
  sd = to_numpy_state_dict(_randomise(_TorchResNet(depths, 16, 8), seed=6).state_dict())
  del sd["layer2.1.conv2.weight"]
  sd["layer3.0.extra_thing.weight"] = np.zeros((3,), np.float32)
  sd["layer3.0.bn2.running_var"] = np.ones((5,), np.float32)  # model has 32 channels

  with pytest.raises(ConversionError) as info:
    convert_torchvision_resnet(sd)
  msg = str(info.value)
  print(msg)
  assert "layer2.1.conv2.weight" in msg  # missing
  assert "layer3.0.extra_thing.weight" in msg  # unused
  assert re.search(r"batch_stats/stage3_block0/norm2/var: checkpoint \(5,\) vs model \(32,\)", msg)
  assert "fc.weight" not in msg and "num_batches_tracked" not in msg  # expected extras

  with pytest.raises(ValueError, match="unknown norm"):
    convert_torchvision_resnet(sd, norm="group_norm")
  del sd["layer4.0.conv1.weight"]
  with pytest.raises(ConversionError, match="cannot infer the depths"):
    convert_torchvision_resnet(sd)


# --- 4. Norms: SyncBN semantics and FrozenBatchNorm. ------------------------------------------


def test_sync_bn_over_global_batch():
  model = ResNet(depths=(1, 1, 1, 1), stem_width=8, width=4, norm="bn")
  variables = _random_variables(model, seed=7)
  # Per-sample offsets so that one device's shard has clearly different statistics.
  x = jax.random.normal(jax.random.key(0), (16, 32, 32, 3), jnp.float32)
  x = x + jnp.arange(16, dtype=jnp.float32)[:, None, None, None] / 4

  @jax.jit(compiler_options=_FAST_COMPILE)
  def step(variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])

  ref_out, ref_state = step(variables, x)

  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  x_sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
  assert len(x_sharded.sharding.device_set) == 8
  out, state = step(variables, x_sharded)

  for name in OUT_NAMES:
    np.testing.assert_allclose(np.asarray(out[name]), np.asarray(ref_out[name]), atol=1e-5)
  flat_ref = flax.traverse_util.flatten_dict(ref_state["batch_stats"], sep="/")
  flat = flax.traverse_util.flatten_dict(state["batch_stats"], sep="/")
  assert flat.keys() == flat_ref.keys()
  for key, value in flat.items():
    np.testing.assert_allclose(np.asarray(value), np.asarray(flat_ref[key]), atol=1e-5, err_msg=key)

  # The stem norm's running-mean update is 0.9 * old + 0.1 * (mean of the stem conv output over
  # the whole batch), not over one device's shard of 2 images.
  stem = jax.lax.conv_general_dilated(
    x,
    variables["params"]["stem_conv"]["kernel"],
    (2, 2),
    ((3, 3), (3, 3)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  old = np.asarray(variables["batch_stats"]["stem_norm"]["mean"])
  new = np.asarray(flat["stem_norm/mean"])
  global_mean = np.asarray(stem.mean(axis=(0, 1, 2)))
  shard_mean = np.asarray(stem[:2].mean(axis=(0, 1, 2)))
  np.testing.assert_allclose(new, 0.9 * old + 0.1 * global_mean, atol=1e-5)
  assert np.max(np.abs(new - (0.9 * old + 0.1 * shard_mean))) > 1e-2


def test_variable_collections_and_init():
  def tree(norm):
    model = ResNet(depths=(1, 1, 1, 1), stem_width=8, width=4, norm=norm)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return {c: flax.traverse_util.flatten_dict(v, sep="/") for c, v in shapes.items()}

  # FrozenBatchNorm: nothing but conv kernels is trainable.
  frozen = tree("frozen_bn")
  assert frozen["params"] and all(k.endswith("kernel") for k in frozen["params"])
  assert "stage2_block0/shortcut_conv/kernel" in frozen["params"]
  # 1 stem norm + 3 per block + 4 projection shortcuts, each with 4 tensors.
  assert len(frozen["batch_stats"]) == 4 * (1 + 3 * 4 + 4)
  assert {k.rsplit("/", 1)[1] for k in frozen["batch_stats"]} == {"scale", "bias", "mean", "var"}
  # BatchNorm: affine trainable, statistics not.
  bn = tree("bn")
  assert "stem_norm/scale" in bn["params"] and "stage1_block0/norm1/bias" in bn["params"]
  assert {k.rsplit("/", 1)[1] for k in bn["batch_stats"]} == {"mean", "var"}

  # torchvision init: kaiming normal, fan_out, gain sqrt(2), untruncated.
  from mpformer_jax.models.resnet import conv_kernel_init

  k = np.asarray(conv_kernel_init(jax.random.key(0, impl="rbg"), (3, 3, 64, 128)))
  assert abs(k.std() / (2.0 / (3 * 3 * 128)) ** 0.5 - 1) < 0.03
  assert np.abs(k).max() > 2.5 * k.std()  # not truncated at 2 sigma
  init = FrozenBatchNorm().init(jax.random.key(0), jnp.zeros((1, 3)))["batch_stats"]
  assert [float(init[n][0]) for n in ("scale", "bias", "mean", "var")] == [1, 0, 0, 1]


def test_frozen_batch_norm_formula():
  c = 5
  rng = np.random.default_rng(0)
  stats = {
    "scale": rng.uniform(0.5, 1.5, c),
    "bias": rng.normal(size=c),
    "mean": rng.normal(size=c),
    "var": rng.uniform(0.1, 2.0, c),
  }
  stats = {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}
  x = rng.normal(size=(2, 3, 4, c)).astype(np.float32)
  y = FrozenBatchNorm().apply({"batch_stats": stats}, jnp.asarray(x))
  s = {k: np.asarray(v) for k, v in stats.items()}
  want = (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * s["scale"] + s["bias"]
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="unknown norm"):
    make_norm("layer_norm")


# --- 5. dtype. --------------------------------------------------------------------------------


def test_bfloat16_compute_float32_params():
  kwargs = dict(depths=(1, 1, 1, 1), stem_width=8, width=4)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  for norm in ("frozen_bn", "bn"):
    shapes = jax.eval_shape(
      ResNet(**kwargs, norm=norm, dtype=jnp.bfloat16).init, jax.random.key(0), x
    )
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes)), norm
    for train in (False, True):
      out = jax.eval_shape(
        lambda v, x, train=train, norm=norm: ResNet(**kwargs, norm=norm, dtype=jnp.bfloat16).apply(
          v, x, train=train, mutable=["batch_stats"]
        ),
        shapes,
        x,
      )
      outs, state = out
      assert all(outs[n].dtype == jnp.bfloat16 for n in OUT_NAMES), (norm, train)
      assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state)), (norm, train)

  # Numerically close to float32 with the same (float32) variables. Same architecture and input
  # shape as the first small parity test, whose float32 compilation this reuses.
  model = ResNet(depths=(1, 2, 1, 1), stem_width=16, width=8)
  variables = _random_variables(model, seed=8)
  x = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
  out16 = _apply(model.clone(dtype=jnp.bfloat16), variables, x)
  out32 = _apply(model, variables, x)
  for name in OUT_NAMES:
    a = np.asarray(out16[name], np.float32)
    b = np.asarray(out32[name])
    err = np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b)))
    print(f"bfloat16 vs float32 {name}: relative max err {err:.3g}")
    assert err < 0.1, name
