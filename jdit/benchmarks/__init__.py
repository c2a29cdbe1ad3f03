"""Benchmarks behind ``jdit bench``; figures are recorded in BENCHMARKS.md."""
