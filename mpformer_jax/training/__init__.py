"""Training: the objective wired to the model, and (later) the sharded train loop."""
