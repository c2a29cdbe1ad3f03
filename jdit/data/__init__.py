"""Datasets: the embedded ones (shapes, moving_shapes videos, digits, and the image sets' export
as image folders) and the real-data paths (TFDS, image folders, JSONL manifests, tar shards,
aspect-ratio buckets, feature cache, grain loaders)."""
