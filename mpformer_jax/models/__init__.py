"""Flax Linen modules of Mask2Former / MP-Former. Imports only jax, flax and numpy."""

from mpformer_jax.models.mask2former import Mask2Former, build_backbone, build_model
from mpformer_jax.models.pixel_decoder import PixelDecoder
from mpformer_jax.models.transformer_decoder import MaskPilotInputs, TransformerDecoder

__all__ = [
  "Mask2Former",
  "MaskPilotInputs",
  "PixelDecoder",
  "TransformerDecoder",
  "build_backbone",
  "build_model",
]
