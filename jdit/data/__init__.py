"""Small embedded datasets for training and evaluating diffusion models."""
