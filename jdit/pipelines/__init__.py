"""Pipelines from published weights: text-to-image (PixArt-α/Σ) and class-to-image (DiT).

    pipe = jdit.pipelines.TextToImage.from_pretrained(path_or_repo_id)
    images = pipe(["a red apple on a table"], num_steps=20, guidance_scale=4.5)
"""

from jdit.pipelines.class_to_image import ClassToImage
from jdit.pipelines.prompts import PromptEncoder
from jdit.pipelines.schedulers import SamplerSpec, from_diffusers_config
from jdit.pipelines.text_to_image import TextToImage
from jdit.pipelines.text_to_video import TextToVideo

__all__ = ["ClassToImage", "PromptEncoder", "SamplerSpec", "TextToImage", "TextToVideo",
           "from_diffusers_config"]
