"""Model configuration defaults (ml_collections).

The model code in `mpformer_jax.models` reads these fields by attribute and never imports
ml_collections, so any object with the same attributes (e.g. `types.SimpleNamespace`) works too.
"""

from __future__ import annotations

import ml_collections

# Presets for the backbones the paper uses. ResNet `depths` are bottleneck blocks per stage.
RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
SWIN_PRESETS = {
  # name: (embed_dim, depths, num_heads, window_size, pretrain_img_size)
  "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
  "small": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224),
  "base": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
  "large": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384),
}


def resnet_config(depth: int = 50, norm: str = "frozen_bn") -> ml_collections.ConfigDict:
  """ResNet-50/101 in the torchvision / detectron2 "v1.5" layout (stride in the 3x3 conv)."""
  return ml_collections.ConfigDict(
    {
      "name": "resnet",
      "resnet": {
        "depths": RESNET_DEPTHS[depth],
        "stem_width": 64,  # channels of the 7x7 stem conv
        "width": 64,  # bottleneck width of the first stage; stage i uses width * 2**i
        "norm": norm,  # "frozen_bn" (detectron2 default) or "bn" (SyncBN under sharded jit)
      },
    }
  )


def swin_config(variant: str = "tiny", drop_path_rate: float = 0.3) -> ml_collections.ConfigDict:
  """Swin-T/S/B/L as used by Mask2Former (outputs at strides 4, 8, 16, 32)."""
  embed_dim, depths, num_heads, window_size, _ = SWIN_PRESETS[variant]
  return ml_collections.ConfigDict(
    {
      "name": "swin",
      "swin": {
        "patch_size": 4,
        "embed_dim": embed_dim,
        "depths": depths,
        "num_heads": num_heads,
        "window_size": window_size,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "drop_path_rate": drop_path_rate,
        "patch_norm": True,
      },
    }
  )


def model_config(num_classes: int = 133, backbone: str = "resnet50") -> ml_collections.ConfigDict:
  """The Mask2Former / MP-Former network with the reference's defaults (spec section 2)."""
  if backbone.startswith("resnet"):
    backbone_cfg = resnet_config(int(backbone[len("resnet") :]))
  elif backbone.startswith("swin_"):
    backbone_cfg = swin_config(backbone[len("swin_") :])
  else:
    raise ValueError(f"model.backbone: unknown backbone {backbone!r}")
  return ml_collections.ConfigDict(
    {
      "num_classes": num_classes,  # K; the class head predicts K + 1 ("no object" last)
      "dtype": "float32",  # compute dtype of backbone and transformer decoder; params stay fp32
      "pixel_decoder_dtype": "float32",  # the reference runs the pixel decoder in fp32
      "backbone": backbone_cfg,
      "pixel_decoder": {
        "conv_dim": 256,
        "mask_dim": 256,
        "num_layers": 6,  # MSDeformAttn encoder layers
        "num_heads": 8,
        "num_points": 4,
        "ffn_dim": 1024,
        "num_levels": 3,  # res3..res5 go through the deformable encoder
        "common_stride": 4,
        # MSDA op: None (best available), "xla", "pallas_gpu" or "pallas_tpu".
        "msda_implementation": ml_collections.FieldReference(None, field_type=str),
      },
      "decoder": {
        "hidden_dim": 256,
        "num_queries": 100,
        "num_heads": 8,
        "ffn_dim": 2048,
        "num_layers": 9,  # 3 rounds over the 1/32, 1/16, 1/8 levels; 10 predictions
        "pre_norm": False,
        "enforce_input_proj": False,
        # Learnable query positional embedding: on for Mask2Former, off for MP-Former, which
        # removes `query_embed` (spec sections 2.4 and 7).
        "query_pos_embed": True,
      },
    }
  )
