"""Whole-network properties: static shapes and compilation, dtypes, config errors, converter CLI."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mpformer_jax import models
from mpformer_jax.convert import __main__ as convert_cli
from mpformer_jax.convert import hf_mask2former
from mpformer_jax.convert.checkpoint_io import load_converted
from tests import hf_reference as ref
from tests.helpers import random_variables, tiny_model_config


def test_one_compilation_per_input_shape():
  config = tiny_model_config()
  model = models.build_model(config)
  variables = random_variables(model, (64, 64))
  traces = []

  @jax.jit
  def forward(variables, images):
    traces.append(images.shape)  # runs only while tracing
    return model.apply(variables, images)

  rng = np.random.default_rng(0)
  for _ in range(3):
    out = forward(variables, rng.standard_normal((2, 64, 64, 3), dtype=np.float32))
  assert traces == [(2, 64, 64, 3)]
  assert forward._cache_size() == 1
  assert out["pred_masks"].shape == (2, 6, 16, 16)
  assert out["pred_logits"].shape == (2, 6, 6)
  assert len(out["aux_outputs"]) == 3

  forward(variables, rng.standard_normal((2, 64, 96, 3), dtype=np.float32))
  forward(variables, rng.standard_normal((2, 64, 96, 3), dtype=np.float32))
  assert traces == [(2, 64, 64, 3), (2, 64, 96, 3)]
  assert forward._cache_size() == 2


@pytest.mark.parametrize("backbone", ["resnet", "swin"])
def test_bfloat16_compute_keeps_float32_params(backbone):
  config = tiny_model_config(backbone=backbone)
  config.dtype = "bfloat16"
  model = models.build_model(config)
  shapes = jax.eval_shape(
    lambda x: model.init(jax.random.PRNGKey(0), x),
    jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
  )
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  variables = random_variables(model, (64, 64))
  images = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype(np.float32)
  out16 = jax.jit(model.apply)(variables, images)
  config.dtype = "float32"
  out32 = jax.jit(models.build_model(config).apply)(variables, images)
  # Heads return float32 logits either way; bfloat16 compute stays close to float32.
  assert out16["pred_logits"].dtype == jnp.float32
  assert out16["pred_masks"].dtype == jnp.float32
  np.testing.assert_allclose(out16["pred_logits"], out32["pred_logits"], atol=0.1, rtol=0.1)
  assert not np.allclose(out16["pred_logits"], out32["pred_logits"], atol=1e-6, rtol=0)


def test_config_errors_name_the_field():
  config = tiny_model_config()
  config.dtype = "float16"
  with pytest.raises(ValueError, match="model.dtype"):
    models.build_model(config)
  config = tiny_model_config()
  config.backbone.name = "vit"
  with pytest.raises(ValueError, match="model.backbone.name"):
    models.build_model(config)


def test_query_pos_embed_switch():
  """MP-Former drops the learnable query positional embedding; Mask2Former has it."""
  for enabled in (True, False):
    config = tiny_model_config()
    config.decoder.query_pos_embed = enabled
    model = models.build_model(config)
    shapes = jax.eval_shape(
      lambda x, m=model: m.init(jax.random.PRNGKey(0), x),
      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )
    assert ("query_embed" in shapes["params"]["transformer_decoder"]) == enabled


def test_convert_cli_round_trip(tmp_path):
  """`python -m mpformer_jax.convert hf-mask2former` on a `save_pretrained` directory."""
  hf_cfg = ref.mask2former_config(
    ref.resnet_backbone_config(),
    decoder_layers=3,
    dim=32,
    heads=2,
    queries=4,
    num_classes=3,
    ffn=64,
  )
  hf_model = ref.build(hf_cfg, seed=0)
  hf_model.save_pretrained(tmp_path / "hf")
  assert (
    convert_cli.main(
      ["hf-mask2former", "--checkpoint", str(tmp_path / "hf"), "--output", str(tmp_path / "out")]
    )
    == 0
  )
  config, variables, metadata = load_converted(tmp_path / "out")
  expected_config, expected = hf_mask2former.load(ref.state_dict(hf_model), hf_cfg)
  assert config.to_dict() == expected_config.to_dict()
  assert metadata["id2label"] == {str(i): f"class_{i}" for i in range(3)}
  jax.tree.map(np.testing.assert_array_equal, variables, expected)

  images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
  out = models.build_model(config).apply(variables, np.transpose(images.numpy(), (0, 2, 3, 1)))
  want = ref.run(hf_model, images)
  np.testing.assert_allclose(out["pred_logits"], want["logits"][-1], atol=1e-4)


def test_torchvision_resnet_cli(tmp_path):
  from tests.test_resnet import _TorchResNet

  net = _TorchResNet((1, 1, 1, 1), stem_width=16, width=8)
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  np.savez(tmp_path / "resnet.npz", **state)
  assert (
    convert_cli.main(
      [
        "torchvision-resnet",
        "--checkpoint",
        str(tmp_path / "resnet.npz"),
        "--output",
        str(tmp_path / "out"),
      ]
    )
    == 0
  )
  config, variables, metadata = load_converted(tmp_path / "out")
  assert config is None and metadata["kind"] == "torchvision_resnet"
  np.testing.assert_array_equal(
    variables["params"]["stem_conv"]["kernel"], np.transpose(state["conv1.weight"], (2, 3, 1, 0))
  )


@pytest.mark.parametrize("implementation", ["pallas_gpu", "pallas_tpu"])
def test_every_msda_implementation_gives_the_same_network(implementation):
  """The config switch selects the kernel (interpret mode here); outputs and gradients agree."""
  config = tiny_model_config(num_layers=1)
  config.pixel_decoder.num_layers = 2
  variables = random_variables(models.build_model(config), (64, 64))
  images = np.random.default_rng(1).standard_normal((2, 64, 64, 3), dtype=np.float32)

  def run(name, interpret):
    config.pixel_decoder.msda_implementation = name
    config.pixel_decoder.msda_interpret = interpret
    model = models.build_model(config)

    def loss(params):
      out = model.apply({**variables, "params": params}, images)
      return jnp.sum(out["pred_masks"] ** 2) + jnp.sum(out["pred_logits"] ** 2), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return out, grads["pixel_decoder"]

  want_out, want_grads = run("xla", False)
  got_out, got_grads = run(implementation, True)
  for key in ("pred_masks", "pred_logits"):
    want = np.asarray(want_out[key])
    np.testing.assert_allclose(got_out[key], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # The deformable attention's own parameters get gradients through all three inputs.
  encoder = "encoder_layer_0"
  for path in ("sampling_offsets", "attention_weights", "value_proj"):
    want = np.asarray(want_grads[encoder]["self_attn"][path]["kernel"])
    got = got_grads[encoder]["self_attn"][path]["kernel"]
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 17])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_broadcast_to_batch_has_broadcast_to_value_and_gradient(batch, dtype):
  from mpformer_jax.models.layers import broadcast_to_batch

  rng = np.random.default_rng(batch)
  x = jnp.asarray(rng.standard_normal((7, 6)), dtype)
  cot = jnp.asarray(rng.standard_normal((batch, 7, 6)), dtype)
  ours, ours_vjp = jax.vjp(lambda x: broadcast_to_batch(x, batch), x)
  ref_out, ref_vjp = jax.vjp(lambda x: jnp.broadcast_to(x[None], (batch, 7, 6)), x)
  np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(ref_out, np.float32))
  (grad,), (ref_grad,) = jax.jit(ours_vjp)(cot), ref_vjp(cot)
  assert grad.dtype == dtype
  tol = 1e-6 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(
    np.asarray(grad, np.float32), np.asarray(ref_grad, np.float32), rtol=tol, atol=tol
  )
