"""Parity of the whole network with the Hugging Face PyTorch Mask2Former (random init, CPU)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from mpformer_jax import models
from mpformer_jax.convert import hf_mask2former
from mpformer_jax.convert.common import ConversionError
from tests import hf_reference as ref

TOL = 1e-4

CASES = {
  # name: (backbone config, Mask2Former kwargs, image (H, W), batch, seed). The seeds were picked
  # (by scanning) so that the attention masks are neither on a knife edge nor trivial; the test
  # re-checks both conditions, so a change in the reference cannot silently weaken it.
  "resnet_3layers": (ref.resnet_backbone_config(), {"decoder_layers": 4}, (64, 96), 2, 1),
  "resnet_9layers": (
    ref.resnet_backbone_config(depths=(1, 2, 1, 1), stem=16, width=8),
    {"decoder_layers": 10, "dim": 32, "heads": 2, "queries": 6, "num_classes": 4},
    (96, 64),
    2,
    1,
  ),
  "swin_6layers": (
    ref.swin_backbone_config(),
    {"decoder_layers": 7, "dim": 32, "heads": 2, "queries": 8, "num_classes": 5, "ffn": 64},
    (96, 128),
    2,
    34,
  ),
}


def _level_sizes(h, w):
  return [(h // 32, w // 32), (h // 16, w // 16), (h // 8, w // 8)]


def _reference(name):
  """Builds the reference; checks its attention masks are neither on a knife edge nor trivial."""
  backbone_cfg, kwargs, (h, w), batch, seed = CASES[name]
  hf_cfg = ref.mask2former_config(backbone_cfg, **kwargs)
  images = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
  model = ref.build(hf_cfg, seed, images)
  out = ref.run(model, images)
  margin, blocked = ref.attention_mask_stats(out["masks"], _level_sizes(h, w))
  print(f"{name}: seed {seed}, margin {margin:.2e}, blocked fractions {blocked}")
  assert margin > 1e-3, f"{name}: a mask logit lies within {margin:.1e} of the threshold"
  assert all(0.2 < f < 0.8 for f in blocked), f"{name}: trivial attention masks {blocked}"
  return hf_cfg, model, images, out


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_hugging_face(name):
  hf_cfg, hf_model, images, expected = _reference(name)
  config, variables = hf_mask2former.load(ref.state_dict(hf_model), hf_cfg)
  assert config.decoder.num_layers == hf_cfg.decoder_layers - 1
  model = models.build_model(config)
  x = np.transpose(images.numpy(), (0, 2, 3, 1))
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)

  ours_logits = [a["pred_logits"] for a in out["aux_outputs"]] + [out["pred_logits"]]
  ours_masks = [a["pred_masks"] for a in out["aux_outputs"]] + [out["pred_masks"]]
  assert len(ours_logits) == len(expected["logits"]) == hf_cfg.decoder_layers
  errors = []
  for i, (lg, mk, elg, emk) in enumerate(
    zip(ours_logits, ours_masks, expected["logits"], expected["masks"], strict=True)
  ):
    assert lg.shape == elg.shape and mk.shape == emk.shape, (i, lg.shape, elg.shape)
    errors.append((float(np.abs(lg - elg).max()), float(np.abs(mk - emk).max())))
  print(name, "max abs error per prediction (class, mask):", errors)
  worst = max(max(e) for e in errors)
  assert worst < TOL, f"{name}: max abs error {worst:.2e} >= {TOL}"


def test_conversion_errors_list_every_problem():
  hf_cfg, hf_model, _, _ = _reference("resnet_3layers")
  sd = ref.state_dict(hf_model)
  removed = "model.transformer_module.decoder.layers.1.fc1.bias"
  misshaped = "model.pixel_level_module.decoder.level_embed"
  del sd[removed]
  sd[misshaped] = np.zeros((5, 64), np.float32)
  sd["model.some_unknown.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError) as err:
    hf_mask2former.load(sd, hf_cfg)
  message = str(err.value)
  for needle in (removed, "model.some_unknown.weight", "level_embed", "(5, 64)"):
    assert needle in message, (needle, message)


def test_hf_config_errors_name_the_field():
  hf_cfg = ref.mask2former_config(ref.resnet_backbone_config())
  hf_cfg.activation_function = "gelu"
  with pytest.raises(ConversionError, match="activation_function"):
    hf_mask2former.config_from_hf(hf_cfg)
