"""LoRA for jdit models: adapters beside the parameters, never inside the model files.

    cfg = jdit.lora.LoraConfig(rank=8, alpha=8.0, targets=("attention", "cross_attention"))
    adapters = jdit.lora.init(params, cfg, rng, module=module)  # B = 0: the base model at first
    y = module.apply({"params": jdit.lora.apply(params, adapters)}, x, t, ...)  # unmerged
    merged = jdit.lora.merge(params, adapters, scale=1.0)        # and jdit.lora.unmerge(...)

:mod:`jdit.lora.core` has the adapters; :mod:`jdit.lora.formats` reads and writes diffusers /
PEFT files.
"""

from jdit.lora.core import (
    DEFAULT_TARGETS,
    TARGETS,
    Adapter,
    LoraConfig,
    adapter_items,
    apply,
    init,
    layout,
    logical_axes,
    merge,
    num_params,
    shardings,
    stack,
    strip,
    unmerge,
    unstack,
)
from jdit.lora.formats import LoraMismatchError, load, read, save, write

__all__ = ["DEFAULT_TARGETS", "TARGETS", "Adapter", "LoraConfig", "adapter_items", "apply",
           "init", "layout", "logical_axes", "merge", "num_params", "shardings", "stack", "strip",
           "unmerge", "unstack", "LoraMismatchError", "load", "read", "save", "write"]
