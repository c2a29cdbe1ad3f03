"""Training: state, optimizers, the loop, checkpoints."""
