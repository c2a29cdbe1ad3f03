"""Checkpoint readers and writers, and name/layout conversion from the PyTorch originals."""

from jdit.weights.jdit_folder import read_checkpoint, write_checkpoint
from jdit.weights.safetensors_io import read_safetensors, read_safetensors_folder, write_safetensors
from jdit.weights.state_dict import CheckpointMismatchError, StateDict
from jdit.weights.torch_pickle import extract_state_dict, load_torch_checkpoint

__all__ = [
    "CheckpointMismatchError", "StateDict", "extract_state_dict", "load_torch_checkpoint",
    "read_checkpoint", "read_safetensors", "read_safetensors_folder", "write_checkpoint",
    "write_safetensors",
]
