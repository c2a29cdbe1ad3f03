"""``jdit aot``: compile for TPU pods you do not have, through libtpu, and read off what matters.

- :mod:`jdit.aot.roofline`: per-chip figures (``CHIPS``), a topology's devices, and the memory,
  FLOPs, HBM and collective bytes and roofline of a compiled program.
- :mod:`jdit.aot.train_step`: a config's train step (``jdit aot --config``), what a model-only
  config is assumed to train with, the largest per-device batch that fits.
- :mod:`jdit.aot.video`: a video pipeline's clips as latents; how ``context`` splits frames.
- :mod:`jdit.aot.pipeline`: T5 → guided sampler → VAE as one program (``jdit aot --pipeline``).
- :mod:`jdit.aot.cache`: the feature-caching program of ``jdit cache`` (VAE encoder + T5) as
  one program: memory per chip, roofline images/s per chip, the largest batch that fits
  (``jdit aot --cache``, planned; ``python -m jdit.aot.cache`` until the CLI has it).

A tool on top of ``jdit.train`` and ``jdit.parallel``: only the CLI and the benchmarks import it.
"""

from jdit.aot.roofline import CHIPS, Chip, analyse, chip_of, collective_bytes, topology_devices
from jdit.aot.train_step import ASSUMED, load, max_batch, report, with_defaults

__all__ = ["ASSUMED", "CHIPS", "Chip", "analyse", "chip_of", "collective_bytes", "load",
           "max_batch", "report", "topology_devices", "with_defaults"]
