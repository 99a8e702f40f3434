"""MP-Former and Mask2Former for image segmentation in JAX/Flax."""

__version__ = "0.1.0"
