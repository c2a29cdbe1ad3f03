"""jdit parameters as diffusers folders (``jdit convert --to diffusers``): diffusers reads them
back to the same outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel

import jdit
from jdit.weights.export import export_state_dict, save_diffusers
from jdit.weights.pixart import convert_diffusers
from tests.helpers import nchw_to_nhwc, rel_err

ROOT = Path(__file__).resolve().parents[2]


def _random_pixart(micro: bool = False, learn_sigma: bool = True, **extra):
    m = jdit.models.build(dict(family="pixart", input_size=16 if not micro else 128,
                               patch_size=2, in_channels=4, hidden_size=48, depth=2,
                               num_heads=3, caption_channels=12, learn_sigma=learn_sigma,
                               micro_condition=micro, pe_interpolation=1.0, **extra))
    params = jdit.nn.perturbed(jdit.models.init_params(m, jax.random.key(0)),
                               jax.random.key(1), 0.05)
    return m, params


@pytest.mark.parametrize("micro, learn_sigma", [(False, True), (True, False)])
def test_diffusers_reads_an_exported_pixart_to_the_same_outputs(tmp_path, micro, learn_sigma):
    m, params = _random_pixart(micro, learn_sigma)
    folder = save_diffusers(tmp_path / "transformer", m, params)
    theirs = PixArtTransformer2DModel.from_pretrained(folder).eval()
    b, side = 2, 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, side, side, generator=gen)
    ctx = torch.randn(b, 5, 12, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    t = torch.tensor([3.0, 700.0])
    added = {"resolution": torch.tensor([[256.0, 256.0]] * b),
             "aspect_ratio": torch.tensor([[1.0]] * b)} if micro else {"resolution": None,
                                                                      "aspect_ratio": None}
    with torch.no_grad():
        want = nchw_to_nhwc(theirs(x, encoder_hidden_states=ctx, timestep=t,
                                   encoder_attention_mask=mask,
                                   added_cond_kwargs=added).sample)
    kw = {k: jnp.asarray(v.numpy()) for k, v in added.items() if v is not None}
    got = np.asarray(m.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)),
                             jnp.asarray(t.numpy()), context=jnp.asarray(ctx.numpy()),
                             context_mask=jnp.asarray(mask.numpy()), **kw))
    assert rel_err(got, want) <= 1e-4
    # and jdit reads the folder back to the very same parameters
    _, again = jdit.models.from_pretrained(folder)
    for a, b_ in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))


def test_export_refuses_what_diffusers_cannot_hold_and_bad_trees(tmp_path):
    m, params = _random_pixart(kv_compress="conv", kv_compress_layers=(1,))
    with pytest.raises(ValueError, match="cannot hold"):
        save_diffusers(tmp_path / "x", m, params)
    m, params = _random_pixart()
    broken = {**params, "extra": {"kernel": np.zeros(3)}}
    with pytest.raises(ValueError, match="do not fit"):
        export_state_dict(convert_diffusers, m, broken)
    save_diffusers(tmp_path / "y", m, params)
    with pytest.raises(FileExistsError):
        save_diffusers(tmp_path / "y", m, params)


@pytest.mark.slow
def test_jdit_convert_to_diffusers_from_a_trained_run(tmp_path):
    """``jdit convert RUN DST --to diffusers`` on a (toy) shapes run: DST loads in diffusers."""
    from jdit.config import load_config
    from jdit.train.loop import train

    cfg = load_config(ROOT / "configs" / "shapes_tiny.py", [
        "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
        "model.caption_channels=16", "data.text_dim=16", "train.batch_size=8", "train.steps=2",
        "train.log_every=1", "train.sample_every=0"])
    train(cfg, tmp_path / "run", quiet=True)
    out = subprocess.run([sys.executable, "-m", "jdit.cli", "convert", str(tmp_path / "run"),
                          str(tmp_path / "dst"), "--to", "diffusers"],
                         capture_output=True, text=True, timeout=600,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["step"] == 2 and report["model"] == "PixArt"
    model = PixArtTransformer2DModel.from_pretrained(tmp_path / "dst")
    assert model.config.num_layers == 1 and model.config.caption_channels == 16
