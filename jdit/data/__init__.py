"""Datasets: the embedded ones (shapes, digits) and the real-data paths (TFDS, image folders,
aspect-ratio buckets, feature cache, grain loaders)."""
