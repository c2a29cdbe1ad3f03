"""TextToImage on 8 simulated CPU devices with the batch split over a `data` mesh axis must give
the images of one device (run by test_text_to_image.py in a fresh process)."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jdit.parallel.mesh import make_mesh  # noqa: E402
from jdit.pipelines import TextToImage  # noqa: E402

folder = sys.argv[1]
prompts = [f"a {c} circle in the top left" for c in
           ("red", "green", "blue", "yellow", "red", "green", "blue", "yellow")]
common = dict(num_steps=4, height=64, width=64, use_resolution_binning=False, seed=3)
single = TextToImage.from_pretrained(folder)(prompts, **common)
mesh = make_mesh({"data": 8, "fsdp": 1, "tensor": 1}, jax.devices())
sharded_pipe = TextToImage.from_pretrained(folder, mesh=mesh)
sharded = sharded_pipe(prompts, **common)
leaf = jax.tree.leaves(sharded_pipe.transformer_params)[0]
assert len(leaf.sharding.device_set) == 8, leaf.sharding
print("max_abs_difference", float(np.abs(sharded - single).max()))
