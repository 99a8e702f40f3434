"""Inference post-processing and metrics."""
