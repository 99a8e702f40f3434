"""Training: the objective, optimiser and train step (jax-only), and the sharded loop.

`objective`, `optimizer`, `train_step` and `sharding` import only jax/flax/optax/numpy/scipy;
`trainer`, `checkpointing` and `reporting` bring in the data pipeline, Orbax and CLU.
"""
