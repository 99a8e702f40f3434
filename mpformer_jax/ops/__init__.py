"""Numerical ops shared by the models: sampling and multi-scale deformable attention."""
