"""What jdit's tests, notebooks and benchmarks build when nothing can be downloaded: small random
diffusers pipelines (:mod:`jdit.testing.tiny_pipelines`). Needs the ``test`` extra (torch,
diffusers, transformers)."""
