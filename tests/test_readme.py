"""The README's five-line example runs as written, on a small diffusers PixArt folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import PixArtTransformer2DModel

README = Path(__file__).resolve().parents[1] / "README.md"


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)


def test_readme_opens_with_the_main_job_then_the_test_command():
    main_job, tests = bash_blocks()[:2]
    assert "jdit train --config configs/shapes_tiny.py" in main_job
    assert "jdit sample" in main_job and "jdit eval" in main_job
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in tests and 'pip install -e ".[test]"' in ci
    assert "pytest -n 2" in tests and "pytest -n 2" in ci


@pytest.mark.slow
def test_readme_main_job_runs_end_to_end(tmp_path):
    """The README's first command, minus the install and with a 20-step run."""
    command = bash_blocks()[0].split("&&", 1)[1]  # after `pip install -e .`
    command = command.replace("--workdir runs/shapes \\",
                              "--workdir runs/shapes --config.train.steps=20 "
                              "--config.train.sample_every=0 \\", 1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    (tmp_path / "configs").symlink_to(README.parent / "configs")  # as from a clone's root
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "grid.png").exists()
    result = json.loads(done.stdout[done.stdout.rindex("{\n"):])
    assert {"adherence_single", "adherence_pair"} <= set(result) and result["step"] == 20


@pytest.mark.slow
def test_readme_example(tmp_path, monkeypatch):
    text = README.read_text()

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


@pytest.mark.slow
def test_readme_pipeline_snippet(tmp_path):
    """The text-to-image snippet, on a small random pipeline in place of the hub repo."""
    from jdit.testing import tiny_pipelines

    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[2]
    assert "TextToImage.from_pretrained" in code
    tiny_pipelines.text_to_image(tmp_path / "pipe", sample_size=8)
    code = code.replace('"PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"', repr(str(tmp_path / "pipe")))
    scope: dict = {}
    # sample_size 8 has no aspect-ratio bins: the snippet's default binning would refuse it
    exec(compile(code.replace("seed=0)", "seed=0, num_steps=2, use_resolution_binning=False)"),
                 str(README), "exec"), scope)
    assert scope["images"].shape == (1, 64, 64, 3)
