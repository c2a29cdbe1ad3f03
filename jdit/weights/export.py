"""jdit parameters back to the PyTorch names a converter reads them from (``jdit convert --to
diffusers``).

Every importer (``convert_diffusers(sd, module)``) only rearranges tensors: it asks a
:class:`~jdit.weights.state_dict.StateDict` for each one by name and PyTorch shape, then
transposes, reshapes, splits or stacks. So the exporter needs no mapping of its own: the
importer runs once on a probe whose tensors hold their own global element indices, and the tree
it builds says, element by element, where each jdit parameter came from; the export scatters
the parameters back there. An importer that computed (scaled, summed) would be caught: the
probe's indices would not come out as integers covering every element exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jdit.weights.state_dict import StateDict, Tree, flatten


class ProbeStateDict(StateDict):
    """A state dict that has every tensor a converter asks for, each element its index."""

    def __init__(self) -> None:
        super().__init__({}, "probe")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.offsets: dict[str, int] = {}
        self.size = 0

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        if key not in self.shapes:
            self.shapes[key], self.offsets[key] = shape, self.size
            self.size += int(np.prod(shape))
        elif self.shapes[key] != shape:
            raise ValueError(f"the converter asks for {key} with shapes {self.shapes[key]} and "
                             f"{shape}")
        n = int(np.prod(shape))
        return (self.offsets[key] + np.arange(n, dtype=np.float64)).reshape(shape)


def export_state_dict(convert: Callable[[StateDict, Any], Tree], module: Any,
                      params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The PyTorch state dict that ``convert`` would turn into ``params`` (float32 numpy)."""
    probe = ProbeStateDict()
    where = flatten(convert(probe, module))
    ours = {k: np.asarray(v, np.float32) for k, v in flatten(dict(params)).items()}
    if set(where) != set(ours):
        raise ValueError(f"the parameters do not fit the model: missing "
                         f"{sorted(set(where) - set(ours))[:5]}, extra "
                         f"{sorted(set(ours) - set(where))[:5]}")
    flat = np.full(probe.size, np.nan, np.float32)
    seen = np.zeros(probe.size, np.int64)
    for path, index in where.items():
        index = np.asarray(index)
        if index.shape != ours[path].shape or not np.all(index == np.round(index)):
            raise ValueError(f"{path}: the importer does not only rearrange its tensors")
        idx = index.astype(np.int64).ravel()
        flat[idx] = ours[path].ravel()
        np.add.at(seen, idx, 1)
    if not np.all(seen == 1):
        raise ValueError(f"{int(np.sum(seen != 1))} tensor elements are read more than once or "
                         f"never: the importer cannot be inverted")
    return {k: flat[probe.offsets[k]:probe.offsets[k] + int(np.prod(s))].reshape(s)
            for k, s in probe.shapes.items()}


def save_diffusers(folder: str | Any, module: Any, params: Mapping[str, Any],
                   overwrite: bool = False) -> Any:
    """Write ``module`` with ``params`` as a diffusers model folder (``config.json`` and
    ``diffusion_pytorch_model.safetensors``, float32), which diffusers' ``from_pretrained`` of
    the model class reads (PixArt: ``PixArtTransformer2DModel``). Returns the folder."""
    import json
    from pathlib import Path

    from jdit.files import atomic_write
    from jdit.weights import pixart
    from jdit.weights.safetensors_io import write_safetensors

    family = type(module).__name__
    writers = {"PixArt": pixart}
    if family not in writers:
        raise ValueError(f"jdit convert --to diffusers writes PixArt models; a {family} stays a "
                         f"jdit checkpoint for now")
    spec = writers[family]
    config = spec.config_to_diffusers(module)  # refuses what diffusers cannot hold, first
    tensors = export_state_dict(spec.convert_diffusers, module, params)
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty (pass overwrite=True)")
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", tensors,
                      metadata={"format": "pt"})
    atomic_write(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folder
