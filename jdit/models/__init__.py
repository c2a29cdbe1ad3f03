"""Model families, the published architectures, and loading/saving weights."""

from jdit.models.dit import DiT, DiTBlock
from jdit.models.latte import Latte, LatteBlock
from jdit.models.loading import from_pretrained, param_shapes, save_pretrained
from jdit.models.lumina2 import Lumina2, Lumina2Block
from jdit.models.pixart import PixArt, PixArtBlock
from jdit.models.pixart_controlnet import PixArtControlNet
from jdit.models.registry import FAMILIES, PRESETS, architecture, build, preset
from jdit.models.sana import Sana, SanaBlock
from jdit.models.sana_controlnet import SanaControlNet
from jdit.models.sana_video import SanaVideo, SanaVideoBlock
from jdit.nn.init import init_params

__all__ = [
    "FAMILIES", "PRESETS", "DiT", "DiTBlock", "Latte", "LatteBlock", "Lumina2", "Lumina2Block", "PixArt", "PixArtBlock", "PixArtControlNet", "architecture", "build",
    "Sana", "SanaBlock", "SanaControlNet", "SanaVideo", "SanaVideoBlock", "from_pretrained", "init_params", "param_shapes", "preset",
    "save_pretrained",
]
