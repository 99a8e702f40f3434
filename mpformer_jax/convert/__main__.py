"""Converts PyTorch checkpoints to an Orbax checkpoint plus our model config.

Hugging Face Mask2Former (a `save_pretrained` directory, or a `.safetensors` file with its
`config.json`):

  python -m mpformer_jax.convert hf-mask2former --checkpoint DIR_OR_FILE [--hf_config config.json]
      --output OUT

torchvision ResNet-50/101 (ImageNet weights for the backbone; `.safetensors`, `.npz`, or `.pth`
which needs torch):

  python -m mpformer_jax.convert torchvision-resnet --checkpoint resnet50.pth --output OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file

    return load_file(path)
  if path.endswith(".npz"):
    with np.load(path) as data:
      return dict(data)
  if path.endswith((".pth", ".pt", ".bin")):
    try:
      import torch
    except ImportError as err:
      raise SystemExit(
        f"{path}: reading a PyTorch pickle needs torch; convert it to .safetensors"
      ) from err
    from mpformer_jax.convert.common import to_numpy_state_dict

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return to_numpy_state_dict(state)
  raise SystemExit(f"{path}: unknown checkpoint format (expected .safetensors, .npz or .pth)")


def _hf_mask2former(args) -> str:
  from mpformer_jax.convert import hf_mask2former
  from mpformer_jax.convert.checkpoint_io import save_converted

  checkpoint = args.checkpoint
  if os.path.isdir(checkpoint):
    hf_config_path = args.hf_config or os.path.join(checkpoint, "config.json")
    checkpoint = os.path.join(checkpoint, "model.safetensors")
  else:
    hf_config_path = args.hf_config
  if not hf_config_path:
    raise SystemExit("--hf_config is required when --checkpoint is a file")
  with open(hf_config_path) as f:
    hf_config = json.load(f)
  config, variables = hf_mask2former.load(_read_state_dict(checkpoint), hf_config)
  metadata = {"source": os.path.abspath(checkpoint), "id2label": hf_config.get("id2label")}
  return save_converted(args.output, config, variables, metadata)


def _torchvision_resnet(args) -> str:
  from mpformer_jax.convert.checkpoint_io import save_converted
  from mpformer_jax.convert.torchvision_resnet import convert_torchvision_resnet

  variables = convert_torchvision_resnet(_read_state_dict(args.checkpoint), norm=args.norm)
  metadata = {"source": os.path.abspath(args.checkpoint), "kind": "torchvision_resnet"}
  return save_converted(args.output, None, variables, metadata)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m mpformer_jax.convert",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="command", required=True)
  hf = sub.add_parser("hf-mask2former", help="Hugging Face Mask2FormerForUniversalSegmentation")
  hf.add_argument("--checkpoint", required=True, help="save_pretrained dir or .safetensors file")
  hf.add_argument("--hf_config", help="config.json (default: beside the checkpoint)")
  hf.add_argument("--output", required=True, help="output directory")
  hf.set_defaults(run=_hf_mask2former)
  tv = sub.add_parser("torchvision-resnet", help="torchvision ResNet-50/101 state dict")
  tv.add_argument("--checkpoint", required=True)
  tv.add_argument("--norm", default="frozen_bn", choices=["frozen_bn", "bn"])
  tv.add_argument("--output", required=True)
  tv.set_defaults(run=_torchvision_resnet)
  args = parser.parse_args(argv)
  out = args.run(args)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
