"""diffusers ``AutoencoderDC`` weights -> :class:`jdit.autoencoders.AutoencoderDC`.

jdit's parameter paths are diffusers' module names with the list indices joined by ``_``
(``encoder/down_blocks_3_0/attn/to_qkv_multiscale_0/proj_in/kernel`` is
``encoder.down_blocks.3.0.attn.to_qkv_multiscale.0.proj_in.weight``), so the converter walks the
module's own parameter tree and asks the state dict for each tensor by its derived name and
PyTorch shape: a block the config implies but the checkpoint lacks is reported missing, one the
checkpoint has but the config does not imply is reported unexpected.
"""

from __future__ import annotations

import re

from flax import linen as nn

from jdit.nn.init import abstract_params
from jdit.weights.state_dict import StateDict, Tree, flatten, put

# jdit leaf name -> PyTorch attribute ("scale" is an RMSNorm's or a BatchNorm2d's weight)
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
           "var": "running_var"}


def torch_name(path: str) -> str:
    """``"decoder/up_blocks_1_0/conv/kernel"`` -> ``"decoder.up_blocks.1.0.conv.weight"``."""
    *modules, leaf = path.split("/")
    return ".".join([re.sub(r"_(\d+)", r".\1", m) for m in modules] + [_LEAVES[leaf]])


def convert(sd: StateDict, vae: nn.Module) -> Tree:
    shapes = abstract_params(vae)
    # BatchNorm2d's step counter does not enter eval-mode inference
    sd.used.update(k for k in sd.tensors if k.endswith(".num_batches_tracked"))
    tree: Tree = {}
    for path, leaf in flatten(shapes).items():
        name, shape = torch_name(path), tuple(leaf.shape)
        if path.endswith("/kernel") and len(shape) == 4:  # Conv2d (O, I/groups, kh, kw)
            w = sd.take(name, (shape[3], shape[2], shape[0], shape[1]))
            put(tree, path, None if w is None else w.transpose(2, 3, 1, 0))
        elif path.endswith("/kernel"):  # Linear (out, in)
            w = sd.take(name, shape[::-1])
            put(tree, path, None if w is None else w.T)
        else:
            put(tree, path, sd.take(name, shape))
    sd.finish()
    return tree
