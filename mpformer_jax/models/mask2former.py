"""The full network: backbone -> pixel decoder -> masked-attention transformer decoder."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mpformer_jax.models.mask_pilot import MaskPilot
from mpformer_jax.models.pixel_decoder import PixelDecoder
from mpformer_jax.models.transformer_decoder import TransformerDecoder
from mpformer_jax.targets import Targets


class Mask2Former(nn.Module):
  """Mask2Former / MP-Former network.

  Attributes:
    backbone: a module mapping `[B, H, W, 3]` to `{"res2", ..., "res5"}` NHWC maps.
    pixel_decoder: the `PixelDecoder`.
    transformer_decoder: the `TransformerDecoder`.
    mask_pilot: MP-Former's `MaskPilot`, or None for Mask2Former.
  """

  backbone: nn.Module
  pixel_decoder: PixelDecoder
  transformer_decoder: TransformerDecoder
  mask_pilot: MaskPilot | None = None

  def __call__(
    self,
    images: jax.Array,
    train: bool = False,
    targets: Targets | None = None,
  ) -> dict[str, Any]:
    """Predicts masks and classes.

    Args:
      images: float32 `[B, H, W, 3]`, normalised with the pixel mean/std; H and W multiples of 32.
      train: training mode (batch-norm statistics, drop path, and the mask pilot).
      targets: the ground truth, needed by the mask pilot in training; ignored otherwise.

    Returns:
      `{"pred_logits": [B, Q, K + 1], "pred_masks": [B, Q, H/4, W/4], "aux_outputs": [...]}`
      (float32 logits; see `TransformerDecoder` for the other keys) and, when the mask pilot
      runs, `"mask_pilot"` holding the MP predictions.
    """
    features = self.backbone(images, train=train)
    mask_features, multi_scale = self.pixel_decoder(features)
    pilot = None
    if self.mask_pilot is not None and train and targets is not None:
      sizes = tuple(tuple(f.shape[1:3]) for f in multi_scale)
      pilot = self.mask_pilot(targets, sizes)
    elif self.mask_pilot is not None and self.is_initializing():
      self.mask_pilot.create_params()
    return self.transformer_decoder(multi_scale, mask_features, pilot)


def _dtype(name: str):
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
  except KeyError:
    raise ValueError(f"model.dtype: expected 'float32' or 'bfloat16', got {name!r}") from None


def build_backbone(config: Any, dtype) -> nn.Module:
  """Builds the backbone named by `config.name` ("resnet" or "swin")."""
  if config.name == "resnet":
    from mpformer_jax.models.resnet import ResNet

    c = config.resnet
    return ResNet(
      depths=tuple(c.depths),
      stem_width=c.stem_width,
      width=c.width,
      norm=c.norm,
      dtype=dtype,
    )
  if config.name == "swin":
    from mpformer_jax.models.swin import SwinTransformer

    c = config.swin
    return SwinTransformer(
      patch_size=c.patch_size,
      embed_dim=c.embed_dim,
      depths=tuple(c.depths),
      num_heads=tuple(c.num_heads),
      window_size=c.window_size,
      mlp_ratio=c.mlp_ratio,
      qkv_bias=c.qkv_bias,
      drop_path_rate=c.drop_path_rate,
      patch_norm=c.patch_norm,
      dtype=dtype,
    )
  raise ValueError(f"model.backbone.name: expected 'resnet' or 'swin', got {config.name!r}")


def build_model(config: Any) -> Mask2Former:
  """Builds the network from a config (`config.model` or the model config itself).

  Args:
    config: an ml_collections config with a `model` field as made by
      `mpformer_jax.config_lib.model_config`, or that model field itself.

  Returns:
    An unbound `Mask2Former` module.
  """
  m = config.model if hasattr(config, "model") else config
  dtype = _dtype(m.dtype)
  pd = m.pixel_decoder
  dec = m.decoder
  mp = getattr(m, "mask_pilot", None)
  mask_pilot = None
  if mp is not None and mp.enabled:
    mask_pilot = MaskPilot(
      num_classes=m.num_classes,
      hidden_dim=dec.hidden_dim,
      num_queries=dec.num_queries,
      num_layers=dec.num_layers,
      groups=mp.groups,
      label_noise_ratio=mp.label_noise_ratio,
      noise_scale=mp.noise_scale,
      all_layers=mp.all_layers,
      group_size=mp.group_size,
      dtype=dtype,
    )
  return Mask2Former(
    backbone=build_backbone(m.backbone, dtype),
    pixel_decoder=PixelDecoder(
      conv_dim=pd.conv_dim,
      mask_dim=pd.mask_dim,
      num_layers=pd.num_layers,
      num_heads=pd.num_heads,
      num_points=pd.num_points,
      ffn_dim=pd.ffn_dim,
      num_levels=pd.num_levels,
      common_stride=pd.common_stride,
      msda_implementation=pd.msda_implementation,
      dtype=_dtype(m.pixel_decoder_dtype),
      msda_interpret=pd.get("msda_interpret", False),
    ),
    transformer_decoder=TransformerDecoder(
      num_classes=m.num_classes,
      hidden_dim=dec.hidden_dim,
      num_queries=dec.num_queries,
      num_heads=dec.num_heads,
      ffn_dim=dec.ffn_dim,
      num_layers=dec.num_layers,
      pre_norm=dec.pre_norm,
      mask_dim=pd.mask_dim,
      enforce_input_proj=dec.enforce_input_proj,
      query_pos_embed=dec.query_pos_embed,
      dtype=dtype,
    ),
    mask_pilot=mask_pilot,
  )
