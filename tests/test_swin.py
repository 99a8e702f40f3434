"""Swin backbone: parity with Hugging Face `SwinBackbone`, converter errors, drop path, dtype."""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpformer_jax.convert.common import ConversionError, StateDictReader, to_numpy_state_dict
from mpformer_jax.convert.hf_swin import convert_hf_swin
from mpformer_jax.models.swin import (
  STAGE_NAMES,
  SwinTransformer,
  relative_position_index,
  shifted_window_mask,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

# (embed_dim, depths, heads, window, image [H, W]). Every stage is larger than the window (where
# HF and the original agree even without `always_partition`); the sizes are not multiples of
# the patch size, of 32 or of the window, so patch, merge and window padding all run; depth-2
# stages exercise the shifted-window mask.
CONFIGS = {
  "w2_pad": dict(embed_dim=24, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), window=2, hw=(102, 138)),
  "w3": dict(embed_dim=32, depths=(1, 1, 3, 1), heads=(2, 2, 4, 4), window=3, hw=(130, 166)),
}


def _jit(fn):
  """jit without XLA's backend optimisations: halves the compile time, which dominates here."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def _hf_backbone(cfg: dict, seed: int):
  torch.manual_seed(seed)
  config = transformers.SwinConfig(
    image_size=cfg["hw"][0],
    patch_size=4,
    embed_dim=cfg["embed_dim"],
    depths=list(cfg["depths"]),
    num_heads=list(cfg["heads"]),
    window_size=cfg["window"],
    drop_path_rate=0.0,
    out_features=["stage1", "stage2", "stage3", "stage4"],
  )
  model = transformers.SwinBackbone(config).eval()
  # HF initialises LayerNorms to 1/0, biases and bias tables to 0: randomise them all so a
  # converter that drops or swaps one of them cannot pass.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias") or "relative_position_bias_table" in name:
        p.copy_(0.5 * torch.randn_like(p))
  return model


def _jax_model(cfg: dict, **kw) -> SwinTransformer:
  return SwinTransformer(
    embed_dim=cfg["embed_dim"],
    depths=cfg["depths"],
    num_heads=cfg["heads"],
    window_size=cfg["window"],
    **kw,
  )


def _expected(model: SwinTransformer, hw) -> dict:
  x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_hf_swin_backbone(name):
  t0 = time.time()
  cfg = CONFIGS[name]
  hf = _hf_backbone(cfg, seed=1)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, *cfg["hw"], 3)).astype(np.float32)
  with torch.no_grad():
    ref = hf(torch.from_numpy(images.transpose(0, 3, 1, 2))).feature_maps
  ref = [r.numpy().transpose(0, 2, 3, 1) for r in ref]

  model = _jax_model(cfg, drop_path_rate=0.3)  # inactive in eval mode
  expected = _expected(model, cfg["hw"])

  # Hub checkpoint layout (what save_pretrained writes), nested as in a Mask2Former checkpoint.
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    saved = safetensors_numpy.load_file(os.path.join(d, "model.safetensors"))
  assert "encoder.layers.0.blocks.0.attention.self.query.weight" in saved
  prefix = "model.pixel_level_module.encoder."
  hub_sd = {prefix + k: v for k, v in saved.items()}
  # Older checkpoints store the relative position index buffers: expected extras.
  hub_sd[prefix + "encoder.layers.0.blocks.0.attention.self.relative_position_index"] = (
    relative_position_index(cfg["window"]).reshape(-1).astype(np.int64)
  )
  # In-memory transformers >= 5 layout (swin.*, q_proj, mlp.fc1, ...), no prefix.
  mem_sd = to_numpy_state_dict(hf.state_dict())
  assert "swin.encoder.layers.0.blocks.0.attention.q_proj.weight" in mem_sd

  apply = _jit(model.apply)
  for layout, sd, pre in (("hub", hub_sd, prefix), ("in-memory", mem_sd, "")):
    reader = StateDictReader(sd)
    variables = reader.finish(convert_hf_swin(reader, pre, cfg["depths"]), expected)
    out = apply(variables, jnp.asarray(images))
    assert list(out) == list(STAGE_NAMES)
    for i, key in enumerate(STAGE_NAMES):
      assert out[key].shape == ref[i].shape, (key, out[key].shape, ref[i].shape)
      assert out[key].dtype == jnp.float32
      err = float(np.max(np.abs(np.asarray(out[key]) - ref[i])))
      print(f"{name} [{layout}] {key} {ref[i].shape}: max abs err {err:.2e}")
      assert err < 1e-4, (name, layout, key, err)
  print(f"{name}: {time.time() - t0:.1f} s")


def test_parity_stage_not_larger_than_window():
  """SwinBackbone (always_partition=True) pads small stages like the original: they agree."""
  cfg = dict(embed_dim=16, depths=(1, 1, 1, 2), heads=(1, 1, 2, 2), window=3, hw=(80, 100))
  # Stage sizes 20x25, 10x13, 5x7, 3x4: the last one is not larger than the window (HF's
  # SwinModel would shrink the window there) and has a shifted block.
  hf = _hf_backbone(cfg, seed=2)
  images = np.random.default_rng(1).normal(size=(1, *cfg["hw"], 3)).astype(np.float32)
  with torch.no_grad():
    ref = hf(torch.from_numpy(images.transpose(0, 3, 1, 2))).feature_maps
  model = _jax_model(cfg)
  reader = StateDictReader(to_numpy_state_dict(hf.state_dict()))
  variables = reader.finish(convert_hf_swin(reader, "", cfg["depths"]), _expected(model, cfg["hw"]))
  out = _jit(model.apply)(variables, jnp.asarray(images))
  for i, key in enumerate(STAGE_NAMES):
    err = float(np.max(np.abs(np.asarray(out[key]) - ref[i].numpy().transpose(0, 2, 3, 1))))
    print(f"small-stage {key}: max abs err {err:.2e}")
    assert err < 1e-4, (key, err)


def test_converter_reports_all_problems_at_once():
  cfg = dict(embed_dim=8, depths=(2, 1, 1, 1), heads=(1, 1, 2, 2), window=2, hw=(64, 64))
  hf = _hf_backbone(cfg, seed=3)
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    sd = safetensors_numpy.load_file(os.path.join(d, "model.safetensors"))
  model = _jax_model(cfg)
  expected = _expected(model, cfg["hw"])

  # The untouched checkpoint converts cleanly (buffers and the unused final norm are accepted).
  sd["encoder.layers.1.blocks.0.attention.self.relative_position_index"] = np.zeros(16, np.int64)
  reader = StateDictReader(sd)
  variables = reader.finish(convert_hf_swin(reader, "", cfg["depths"]), expected)
  qkv = variables["params"]["layers_0"]["blocks_1"]["attn"]["qkv"]
  np.testing.assert_array_equal(
    qkv["kernel"][:, 8:16], sd["encoder.layers.0.blocks.1.attention.self.key.weight"].T
  )
  np.testing.assert_array_equal(
    qkv["bias"][16:], sd["encoder.layers.0.blocks.1.attention.self.value.bias"]
  )

  bad = dict(sd)
  del bad["encoder.layers.2.downsample.reduction.weight"]
  del bad["hidden_states_norms.stage4.bias"]
  bad["encoder.layers.0.blocks.0.extra.weight"] = np.zeros(3, np.float32)
  bad["encoder.layers.1.blocks.0.attention.self.relative_position_bias_table"] = np.zeros(
    (25, 1), np.float32
  )
  bad["encoder.layers.0.blocks.1.layernorm_after.weight"] = np.ones(9, np.float32)
  # q/k/v pieces that cannot be fused are reported on the fused kernel.
  bad["encoder.layers.0.blocks.0.attention.self.query.weight"] = np.zeros((8, 9), np.float32)
  reader = StateDictReader(bad)
  with pytest.raises(ConversionError) as e:
    reader.finish(convert_hf_swin(reader, "", cfg["depths"]), expected)
  msg = str(e.value)
  print(msg)
  for needle in (
    "encoder.layers.2.downsample.reduction.weight",
    "hidden_states_norms.stage4.bias",
    "encoder.layers.0.blocks.0.extra.weight",
    "layers_1/blocks_0/attn/relative_position_bias_table: checkpoint (25, 1) vs model (9, 1)",
    "layers_0/blocks_1/norm2/scale: checkpoint (9,) vs model (8,)",
    "layers_0/blocks_0/attn/qkv/kernel: checkpoint (0,) vs model (8, 24)",
  ):
    assert needle in msg, needle
  assert "relative_position_index" not in msg

  # A checkpoint with more blocks than the model: the extra block is reported as unused.
  reader = StateDictReader(sd)
  with pytest.raises(ConversionError, match=r"encoder\.layers\.0\.blocks\.1\.layernorm_before"):
    reader.finish(
      convert_hf_swin(reader, "", (1, 1, 1, 1)),
      _expected(_jax_model(dict(cfg, depths=(1, 1, 1, 1))), cfg["hw"]),
    )


def _small_model(**kw) -> SwinTransformer:
  return SwinTransformer(embed_dim=16, num_heads=(1, 2, 2, 4), window_size=2, **kw)


def _random_variables(model: SwinTransformer, hw, seed: int = 0) -> dict:
  """Random float32 params from the abstract tree (`model.init` would compile a PRNG kernel
  per parameter, tens of seconds on a shared 2-core CPU)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return (1.0 + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
    std = 0.1 if leaf.ndim == 1 or "table" in name else 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
    return (std * rng.normal(size=leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, _expected(model, hw))


def test_drop_path_train_and_eval():
  hw = (32, 40)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, *hw, 3)), jnp.float32)
  depths = (1, 1, 1, 1)  # rates 0, 1/6, 1/3, 1/2: stages 2-4 drop
  model = _small_model(depths=depths, drop_path_rate=0.5)
  variables = _random_variables(model, hw)

  train_apply = _jit(lambda key: model.apply(variables, x, train=True, rngs={"dropout": key}))
  a = train_apply(jax.random.key(1))
  b = train_apply(jax.random.key(2))
  a2 = train_apply(jax.random.key(1))
  for key in STAGE_NAMES:
    assert np.all(np.isfinite(np.asarray(a[key])))
    assert np.all(np.isfinite(np.asarray(b[key])))
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(a2[key]))
  assert not np.allclose(np.asarray(a["res5"]), np.asarray(b["res5"]))
  # The first block has rate 0, so res2 is unaffected.
  np.testing.assert_array_equal(np.asarray(a["res2"]), np.asarray(b["res2"]))

  evaluate = _jit(lambda v: model.apply(v, x, train=False))
  evaluated, eval_again = evaluate(variables), evaluate(variables)
  no_drop = _jit(lambda v: _small_model(depths=depths, drop_path_rate=0.0).apply(v, x))(variables)
  for key in STAGE_NAMES:
    np.testing.assert_array_equal(np.asarray(evaluated[key]), np.asarray(eval_again[key]))
    np.testing.assert_array_equal(np.asarray(evaluated[key]), np.asarray(no_drop[key]))
  for key in ("res3", "res4", "res5"):
    assert not np.allclose(np.asarray(a[key]), np.asarray(evaluated[key])), key


def test_bfloat16_compute_float32_params():
  hw = (36, 44)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *hw, 3)), jnp.float32)
  model32 = _small_model(depths=(2, 1, 1, 1))
  model16 = _small_model(depths=(2, 1, 1, 1), dtype=jnp.bfloat16)
  abstract = _expected(model16, hw)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract))
  variables = _random_variables(model32, hw)
  out16 = _jit(model16.apply)(variables, x)
  out32 = _jit(model32.apply)(variables, x)
  strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
  for i, key in enumerate(STAGE_NAMES):
    assert out16[key].dtype == jnp.bfloat16
    shape = (2, -(-hw[0] // strides[key]), -(-hw[1] // strides[key]), 16 * 2**i)
    assert out16[key].shape == shape, (key, out16[key].shape)
    diff = np.abs(np.asarray(out16[key], np.float32) - np.asarray(out32[key]))
    print(f"bf16 vs f32 {key}: mean abs diff {diff.mean():.3f}, max {diff.max():.3f}")
    assert np.all(np.isfinite(diff)) and diff.mean() < 0.05, (key, diff.mean())


def test_init_tree_and_static_helpers():
  model = SwinTransformer()  # Swin-T defaults
  shapes = _expected(model, (224, 224))["params"]
  assert shapes["patch_embed"]["proj"]["kernel"].shape == (4, 4, 3, 96)
  attn = shapes["layers_2"]["blocks_5"]["attn"]
  assert attn["qkv"]["kernel"].shape == (384, 3 * 384)
  assert attn["relative_position_bias_table"].shape == (13 * 13, 12)
  assert shapes["layers_2"]["downsample"]["reduction"]["kernel"].shape == (4 * 384, 768)
  assert "bias" not in shapes["layers_2"]["downsample"]["reduction"]
  assert "downsample" not in shapes["layers_3"]
  assert shapes["norm3"]["scale"].shape == (768,)
  assert model.out_channels == {"res2": 96, "res3": 192, "res4": 384, "res5": 768}
  n_params = sum(np.prod(p.shape) for p in jax.tree.leaves(shapes))
  # Swin-T backbone: 27.5M parameters (28.3M with the classification head).
  assert 27.4e6 < n_params < 27.6e6, n_params

  idx = relative_position_index(3)
  assert idx.shape == (9, 9) and idx.min() == 0 and idx.max() == 24
  assert np.all(np.diag(idx) == 12)  # zero offset is the table centre
  mask = shifted_window_mask(6, 6, 3, 1)
  assert mask.shape == (4, 9, 9)
  assert np.all(mask[0] == 0)  # the top-left window holds one region only
  assert set(np.unique(mask[3])) == {0.0, -100.0}
