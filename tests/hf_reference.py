"""Builds small Hugging Face PyTorch Mask2Former models as independent parity references.

Every tensor that Hugging Face initialises to a constant (norm affine and statistics, zero
biases, the deformable-attention offset and weight layers) is randomised, so that a converter
that mixes such tensors up cannot pass.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
  Mask2FormerConfig,
  Mask2FormerForUniversalSegmentation,
  ResNetConfig,
  SwinConfig,
)

from mpformer_jax.convert.common import to_numpy_state_dict


def resnet_backbone_config(depths=(1, 1, 1, 1), stem=16, width=8) -> ResNetConfig:
  return ResNetConfig(
    embedding_size=stem,
    hidden_sizes=[4 * width * 2**i for i in range(4)],
    depths=list(depths),
    layer_type="bottleneck",
    out_features=["stage1", "stage2", "stage3", "stage4"],
  )


def swin_backbone_config(embed_dim=24, depths=(1, 1, 2, 1), heads=(1, 2, 3, 4), window=2):
  return SwinConfig(
    embed_dim=embed_dim,
    depths=list(depths),
    num_heads=list(heads),
    window_size=window,
    drop_path_rate=0.0,
    out_features=["stage1", "stage2", "stage3", "stage4"],
  )


def mask2former_config(
  backbone_config,
  *,
  dim=64,
  heads=4,
  enc_layers=2,
  decoder_layers=4,
  queries=10,
  num_classes=7,
  ffn=128,
) -> Mask2FormerConfig:
  return Mask2FormerConfig(
    backbone_config=backbone_config,
    feature_size=dim,
    mask_feature_size=dim,
    hidden_dim=dim,
    encoder_feedforward_dim=ffn,
    encoder_layers=enc_layers,
    decoder_layers=decoder_layers,
    num_attention_heads=heads,
    dim_feedforward=ffn,
    num_queries=queries,
    id2label={i: f"class_{i}" for i in range(num_classes)},
  )


@torch.no_grad()
def randomise_constants(model: torch.nn.Module, seed: int) -> None:
  """Replaces every constant-initialised tensor with random values of a sensible scale."""
  g = torch.Generator().manual_seed(seed)
  rand = lambda t: torch.randn(t.shape, generator=g)
  for name, t in model.state_dict().items():
    if not t.is_floating_point():
      continue
    if name.endswith("running_var"):
      t.copy_(0.5 + torch.rand(t.shape, generator=g))
    elif name.endswith("running_mean"):
      t.copy_(0.1 * rand(t))
    elif name.endswith("sampling_offsets.weight"):
      t.copy_(0.02 * rand(t))
    elif name.endswith("attention_weights.weight"):
      t.copy_(0.05 * rand(t))
    elif name.endswith((".bias", "_bias")):
      if "sampling_offsets" in name:
        t.add_(0.2 * rand(t))
      else:
        t.copy_(0.1 * rand(t))
    elif t.dim() == 1 and name.endswith(".weight"):  # norm scales
      t.copy_(1.0 + 0.2 * rand(t))
    elif "relative_position_bias_table" in name:
      t.copy_(0.5 * rand(t))


def build(
  config: Mask2FormerConfig, seed: int, images: torch.Tensor | None = None, mask_scale: float = 60.0
) -> Mask2FormerForUniversalSegmentation:
  """A randomised reference model.

  With `images`, the mask projection is re-centred so that each channel of `mask_features` has
  zero mean over these images, and scaled by `mask_scale`. Random weights otherwise give mask
  logits dominated by one offset, so that attention masks come out all blocked or all open and
  the masked attention would go untested; centred, roughly half of every mask is blocked.
  """
  torch.manual_seed(seed)
  model = Mask2FormerForUniversalSegmentation(config).eval()
  randomise_constants(model, seed + 1)
  if images is not None:
    with torch.no_grad():
      proj = model.model.pixel_level_module.decoder.mask_projection
      feats = model.model.pixel_level_module(images).decoder_last_hidden_state
      proj.bias -= feats.mean(dim=(0, 2, 3))
      proj.weight *= mask_scale
      proj.bias *= mask_scale
  return model


@torch.no_grad()
def run(model, images_nchw: torch.Tensor) -> dict:
  """Runs the reference; returns numpy class/mask logits of every prediction, in decoder order."""
  out = model(images_nchw, output_auxiliary_logits=True)
  aux = out.auxiliary_logits or []
  logits = [a["class_queries_logits"].numpy() for a in aux] + [out.class_queries_logits.numpy()]
  masks = [a["masks_queries_logits"].numpy() for a in aux] + [out.masks_queries_logits.numpy()]
  return {"logits": logits, "masks": masks}


def attention_mask_stats(
  masks: list[np.ndarray], level_sizes: list[tuple[int, int]]
) -> tuple[float, list[float]]:
  """How the masked attention thresholds the predictions (bilinear resize, sigmoid < 0.5).

  Returns:
    `(margin, blocked_fractions)`: the smallest |logit| that is thresholded (near 0, float
    rounding could flip an attention-mask bit between two correct implementations, so parity
    tests pick seeds where it is comfortable), and the fraction of blocked positions per layer
    (near 0 or 1 the masking would go untested).
  """
  margin, fractions = np.inf, []
  for i, m in enumerate(masks[:-1]):
    size = level_sizes[i % len(level_sizes)]
    r = F.interpolate(torch.from_numpy(m), size=size, mode="bilinear", align_corners=False)
    margin = min(margin, float(r.abs().min()))
    fractions.append(float((r.sigmoid() < 0.5).float().mean()))
  return margin, fractions


def state_dict(model) -> dict[str, np.ndarray]:
  return to_numpy_state_dict(model.state_dict())
