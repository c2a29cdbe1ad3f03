"""Datasets: the embedded ones (shapes, digits, and their export as image folders) and the
real-data paths (TFDS, image folders, JSONL manifests, tar shards, aspect-ratio buckets, feature
cache, grain loaders)."""
