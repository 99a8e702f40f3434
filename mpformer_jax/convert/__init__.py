"""Converters from PyTorch checkpoints (Hugging Face Mask2Former, torchvision ResNet)."""
