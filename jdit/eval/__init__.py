"""Evaluators for generated samples."""
