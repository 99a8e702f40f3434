"""Hugging Face `Mask2FormerForUniversalSegmentation` -> our config and Flax variables.

Needs no torch: the state dict comes as numpy arrays or as a `.safetensors` file.

Hugging Face counts decoder layers differently from the reference: its `decoder_layers=N` builds
N - 1 layers and N predictions (the initial queries plus one per layer), exactly the reference's
`DEC_LAYERS=N`. Our `decoder.num_layers` counts layers, so it is `decoder_layers - 1`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mpformer_jax import config_lib, models
from mpformer_jax.convert.common import ConversionError, StateDictReader

# Keys a Hugging Face checkpoint carries that have no counterpart in the network.
EXPECTED_EXTRAS = (".num_batches_tracked", "criterion.empty_weight", ".relative_position_index")

_BACKBONE = "model.pixel_level_module.encoder."
_PIXEL = "model.pixel_level_module.decoder."
_TRANSFORMER = "model.transformer_module."


def _as_dict(hf_config: Any) -> dict[str, Any]:
  if hasattr(hf_config, "to_dict"):
    hf_config = hf_config.to_dict()
  return dict(hf_config)


def _check(cond: bool, field: str, message: str):
  if not cond:
    raise ConversionError(f"Hugging Face config field {field!r}: {message}")


def config_from_hf(hf_config: Any) -> ml_collections.ConfigDict:
  """Our model config for a Hugging Face `Mask2FormerConfig` (object or dict)."""
  hf = _as_dict(hf_config)
  bb = _as_dict(hf.get("backbone_config") or {})
  _check(
    bb.get("model_type") in ("resnet", "swin"),
    "backbone_config.model_type",
    f"only 'resnet' and 'swin' are supported, got {bb.get('model_type')!r}",
  )
  out_features = bb.get("out_features") or ["stage1", "stage2", "stage3", "stage4"]
  _check(
    list(out_features) == ["stage1", "stage2", "stage3", "stage4"],
    "backbone_config.out_features",
    f"expected stage1..stage4, got {out_features}",
  )
  _check(
    list(hf.get("feature_strides", (4, 8, 16, 32))) == [4, 8, 16, 32],
    "feature_strides",
    f"expected [4, 8, 16, 32], got {hf.get('feature_strides')}",
  )
  _check(
    hf.get("activation_function", "relu") == "relu",
    "activation_function",
    "only 'relu' is supported",
  )
  id2label = hf.get("id2label")
  _check(bool(id2label), "id2label", "needed to know the number of classes")

  if bb["model_type"] == "resnet":
    _check(
      bb.get("layer_type", "bottleneck") == "bottleneck",
      "backbone_config.layer_type",
      "only bottleneck ResNets are supported",
    )
    _check(
      not bb.get("downsample_in_first_stage", False),
      "backbone_config.downsample_in_first_stage",
      "must be False (torchvision layout)",
    )
    _check(
      not bb.get("downsample_in_bottleneck", False),
      "backbone_config.downsample_in_bottleneck",
      "must be False (stride in the 3x3)",
    )
    hidden = list(bb["hidden_sizes"])
    width = hidden[0] // 4
    _check(
      hidden == [4 * width * 2**i for i in range(4)],
      "backbone_config.hidden_sizes",
      f"expected 4 * width * 2**stage, got {hidden}",
    )
    backbone = config_lib.resnet_config(50)
    backbone.resnet.depths = tuple(bb["depths"])
    backbone.resnet.stem_width = bb["embedding_size"]
    backbone.resnet.width = width
    # Hugging Face's BatchNorm in eval mode computes exactly FrozenBatchNorm.
    backbone.resnet.norm = "frozen_bn"
  else:
    _check(
      not bb.get("use_absolute_embeddings", False),
      "backbone_config.use_absolute_embeddings",
      "absolute position embeddings are not supported",
    )
    _check(bb.get("hidden_act", "gelu") == "gelu", "backbone_config.hidden_act", "must be 'gelu'")
    backbone = config_lib.swin_config("tiny")
    s = backbone.swin
    s.patch_size = bb["patch_size"]
    s.embed_dim = bb["embed_dim"]
    s.depths = tuple(bb["depths"])
    s.num_heads = tuple(bb["num_heads"])
    s.window_size = bb["window_size"]
    s.mlp_ratio = float(bb["mlp_ratio"])
    s.qkv_bias = bool(bb["qkv_bias"])
    s.drop_path_rate = float(bb["drop_path_rate"])

  config = config_lib.model_config(num_classes=len(id2label))
  config.backbone = backbone
  pd = config.pixel_decoder
  pd.conv_dim = hf["feature_size"]
  pd.mask_dim = hf["mask_feature_size"]
  pd.num_layers = hf["encoder_layers"]
  pd.num_heads = hf["num_attention_heads"]
  pd.ffn_dim = hf["encoder_feedforward_dim"]
  pd.common_stride = hf["common_stride"]
  dec = config.decoder
  dec.hidden_dim = hf["hidden_dim"]
  dec.num_queries = hf["num_queries"]
  dec.num_heads = hf["num_attention_heads"]
  dec.ffn_dim = hf["dim_feedforward"]
  dec.num_layers = hf["decoder_layers"] - 1
  dec.pre_norm = bool(hf["pre_norm"])
  dec.enforce_input_proj = bool(hf["enforce_input_projection"])
  dec.query_pos_embed = True  # Hugging Face models are Mask2Former
  return config


def _attention(reader: StateDictReader, prefix: str, num_heads: int, fused: bool):
  """q/k/v/out projections -> our `MultiHeadAttention` ([D, heads, head_dim] kernels)."""
  if fused:  # nn.MultiheadAttention: one [3D, D] in_proj
    w = reader.get(f"{prefix}.in_proj_weight")
    bias = reader.get(f"{prefix}.in_proj_bias")
    ws = [None] * 3 if w is None else np.split(w, 3, axis=0)
    bs = [None] * 3 if bias is None else np.split(bias, 3, axis=0)
    out = reader.linear(f"{prefix}.out_proj")
  else:  # Mask2FormerAttention: q_proj, k_proj, v_proj, out_proj
    ws, bs = [], []
    for name in ("q_proj", "k_proj", "v_proj"):
      lin = reader.linear(f"{prefix}.{name}")
      ws.append(None if lin["kernel"] is None else lin["kernel"].T)
      bs.append(lin["bias"])
    out = reader.linear(f"{prefix}.out_proj")

  def split_heads(w, b):
    if w is None or b is None:
      return {"kernel": w, "bias": b}
    d = w.shape[1]
    return {
      "kernel": w.T.reshape(d, num_heads, w.shape[0] // num_heads),
      "bias": b.reshape(num_heads, -1),
    }

  params = {n: split_heads(w, b) for n, w, b in zip(("query", "key", "value"), ws, bs, strict=True)}
  k = out["kernel"]
  params["out"] = {
    "kernel": None if k is None else k.reshape(num_heads, k.shape[0] // num_heads, k.shape[1]),
    "bias": out["bias"],
  }
  return params


def _pixel_decoder(reader: StateDictReader, config) -> dict[str, Any]:
  pd = config.pixel_decoder
  p = _PIXEL
  params: dict[str, Any] = {"level_embed": reader.get(f"{p}level_embed")}
  for lvl in range(pd.num_levels):
    params[f"input_proj_{lvl}"] = {
      "conv": reader.conv(f"{p}input_projections.{lvl}.0"),
      "norm": reader.norm(f"{p}input_projections.{lvl}.1"),
    }
  for i in range(pd.num_layers):
    q = f"{p}encoder.layers.{i}."
    params[f"encoder_layer_{i}"] = {
      "self_attn": {
        n: reader.linear(f"{q}self_attn.{n}")
        for n in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
      },
      "norm1": reader.norm(f"{q}self_attn_layer_norm"),
      "linear1": reader.linear(f"{q}fc1"),
      "linear2": reader.linear(f"{q}fc2"),
      "norm2": reader.norm(f"{q}final_layer_norm"),
    }
  params["mask_features"] = reader.conv(f"{p}mask_projection")
  # Hugging Face numbers the FPN convs from high resolution (adapter_1 = res2); with the default
  # single FPN level that is our index 0.
  idx = 1
  while reader.has(f"{p}adapter_{idx}.0.weight"):
    j = idx - 1
    params[f"lateral_conv_{j}"] = {
      "conv": reader.conv(f"{p}adapter_{idx}.0", bias=False),
      "norm": reader.norm(f"{p}adapter_{idx}.1"),
    }
    params[f"output_conv_{j}"] = {
      "conv": reader.conv(f"{p}layer_{idx}.0", bias=False),
      "norm": reader.norm(f"{p}layer_{idx}.1"),
    }
    idx += 1
  return params


def _transformer_decoder(reader: StateDictReader, config) -> dict[str, Any]:
  dec = config.decoder
  p = _TRANSFORMER
  params: dict[str, Any] = {
    "query_feat": reader.embedding(f"{p}queries_features.weight"),
    "query_embed": reader.embedding(f"{p}queries_embedder.weight"),
    "level_embed": reader.embedding(f"{p}level_embed.weight"),
  }
  for lvl in range(3):
    if reader.has(f"{p}input_projections.{lvl}.weight"):
      params[f"input_proj_{lvl}"] = reader.conv(f"{p}input_projections.{lvl}")
  for i in range(dec.num_layers):
    q = f"{p}decoder.layers.{i}."
    params[f"layer_{i}"] = {
      "cross_attn": _attention(reader, f"{q}cross_attn", dec.num_heads, fused=True),
      "cross_attn_norm": reader.norm(f"{q}cross_attn_layer_norm"),
      "self_attn": _attention(reader, f"{q}self_attn", dec.num_heads, fused=False),
      "self_attn_norm": reader.norm(f"{q}self_attn_layer_norm"),
      "linear1": reader.linear(f"{q}fc1"),
      "linear2": reader.linear(f"{q}fc2"),
      "ffn_norm": reader.norm(f"{q}final_layer_norm"),
    }
  params["heads"] = {
    "decoder_norm": reader.norm(f"{p}decoder.layernorm"),
    "class_embed": reader.linear("class_predictor"),
    "mask_embed": {
      f"layers_{j}": reader.linear(f"{p}decoder.mask_predictor.mask_embedder.{j}.0")
      for j in range(3)
    },
  }
  return params


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` file into numpy arrays (no torch needed)."""
  from safetensors.numpy import load_file

  return load_file(os.fspath(path))


def abstract_variables(model, config, image_size: tuple[int, int] = (64, 64)):
  """The model's variable shapes, from `jax.eval_shape` (nothing is allocated)."""
  del config
  images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)


def load(
  state_dict: Mapping[str, Any] | str | os.PathLike, hf_config: Any
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """Converts a Hugging Face Mask2Former checkpoint.

  Args:
    state_dict: the `Mask2FormerForUniversalSegmentation` state dict as numpy arrays, or a path
      to its `.safetensors` file.
    hf_config: its `Mask2FormerConfig` (object or `to_dict()` dict).

  Returns:
    `(model_config, variables)`: build the network with `models.build_model(model_config)` and
    run it with `model.apply(variables, images)`.

  Raises:
    ConversionError: listing every missing, unused or mis-shaped tensor, or an unsupported
      config field.
  """
  if isinstance(state_dict, str | os.PathLike):
    state_dict = load_state_dict(state_dict)
  config = config_from_hf(hf_config)
  reader = StateDictReader(state_dict, ignored=EXPECTED_EXTRAS)
  bb = config.backbone
  if bb.name == "resnet":
    from mpformer_jax.convert.torchvision_resnet import convert_hf_resnet

    backbone = convert_hf_resnet(reader, _BACKBONE, tuple(bb.resnet.depths), bb.resnet.norm)
  else:
    from mpformer_jax.convert.hf_swin import convert_hf_swin

    backbone = convert_hf_swin(reader, _BACKBONE, tuple(bb.swin.depths))
  variables: dict[str, Any] = {
    "params": {
      "backbone": backbone.get("params", {}),
      "pixel_decoder": _pixel_decoder(reader, config),
      "transformer_decoder": _transformer_decoder(reader, config),
    }
  }
  if backbone.get("batch_stats"):
    variables["batch_stats"] = {"backbone": backbone["batch_stats"]}
  expected = abstract_variables(models.build_model(config), config)
  return config, reader.finish(variables, expected)
