"""The README's five-line example runs as written, on a small diffusers PixArt folder."""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from diffusers import PixArtTransformer2DModel

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_commands_and_example(tmp_path, monkeypatch):
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert 'pip install -e ".[test]"' in first_block and "pytest" in first_block
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in ci and "pytest -n 2" in ci and "pytest -n 2" in first_block

    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    folder = tmp_path / "PixArt-Sigma-XL-2-1024-MS" / "transformer"
    PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1,
                             cross_attention_dim=16, caption_channels=4096, sample_size=128,
                             use_additional_conditions=False).save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    out = np.asarray(scope["eps_and_sigma"])
    assert out.shape == (1, 128, 128, 8) and np.all(np.isfinite(out))

    # The sampling snippet, continuing in the same scope with [uncond; cond] caption features.
    sampling = re.findall(r"```python\n(.*?)```", text, re.S)[1]
    scope.update(noise=jnp.ones((1, 128, 128, 4)), c2=jnp.zeros((2, 300, 4096)),
                 m2=jnp.ones((2, 300)))
    exec(compile(sampling, str(README), "exec"), scope)
    latents = np.asarray(scope["latents"])
    assert latents.shape == (1, 128, 128, 4) and np.all(np.isfinite(latents))
