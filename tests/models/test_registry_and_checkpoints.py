"""Presets match the published sizes; jdit checkpoints round-trip; ``jdit convert`` works."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

import jdit
from jdit.cli import main as cli_main
from jdit.config import load_config, section
from tests.reference.official_pixart import OfficialPixArt


def n_params(module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jdit.models.param_shapes(module)))


def meta_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


CONFIGS = Path(__file__).resolve().parents[2] / "configs"

PIXART_XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                 num_layers=28, cross_attention_dim=1152, caption_channels=4096)


@pytest.mark.parametrize("name,config", [
    ("pixart_alpha_xl2_1024", dict(sample_size=128, use_additional_conditions=True)),
    ("pixart_sigma_xl2_1024", dict(sample_size=128, use_additional_conditions=False)),
    ("pixart_sigma_xl2_2k", dict(sample_size=256, use_additional_conditions=False)),
])
def test_pixart_presets_match_diffusers_parameter_counts(name, config):
    with torch.device("meta"):
        ref = PixArtTransformer2DModel(**PIXART_XL, **config)
    assert n_params(jdit.models.build(jdit.models.preset(name))) == meta_count(ref)


def test_published_counts():
    # Figures from pixart.md (diffusers, full size): 611,349,152 (α-1024) and 610,856,096 (Σ).
    assert n_params(jdit.models.build(jdit.models.preset("pixart_alpha_xl2_1024"))) == 611_349_152
    assert n_params(jdit.models.build(jdit.models.preset("pixart_sigma_xl2_512"))) == 610_856_096


def test_kv_compress_preset_matches_official_layout():
    with torch.device("meta"):
        ref = OfficialPixArt(input_size=128, hidden_size=1152, depth=28, num_heads=16,
                             caption_channels=4096, sampling="conv", scale_factor=2,
                             kv_compress_layer=tuple(range(14, 28)), model_max_length=300)
    jd = jdit.models.build(jdit.models.preset("pixart_sigma_xl2_1024_kvcompress"))
    # y_embedding is a buffer, pos_embed a buffer: neither is a jdit parameter
    assert n_params(jd) == meta_count(ref)


def test_dit_preset_matches_diffusers_minus_per_block_embedder_copies():
    with torch.device("meta"):
        ref = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                    out_channels=8, num_layers=28, sample_size=32)
    emb = meta_count(ref.transformer_blocks[0].norm1.emb)
    jd = jdit.models.build(jdit.models.preset("dit_xl2_256"))
    assert n_params(jd) == meta_count(ref) - 27 * emb


@pytest.mark.parametrize("name", sorted(jdit.models.PRESETS))
def test_config_files_build_their_preset(name):
    config = load_config(CONFIGS / f"{name}.py")
    module = jdit.models.build(config.model)
    assert jdit.models.architecture(module) == jdit.models.architecture(
        jdit.models.build(jdit.models.preset(name)))
    facts = config.pipeline  # one source: the registry's PIPELINE_FACTS
    assert facts.to_dict() == section("pipeline", jdit.models.registry.PIPELINE_FACTS[name])
    assert facts.resolution // facts.vae_factor == module.input_size


def test_save_and_load_round_trip_across_layouts(tmp_path):
    module = jdit.models.build("pixart", input_size=8, hidden_size=48, depth=3, num_heads=4,
                               caption_channels=16, kv_compress="conv", kv_compress_layers=(2,),
                               scan_layers=True)
    params = jdit.models.init_params(module, jax.random.key(3))
    jdit.models.save_pretrained(module, params, tmp_path / "ck")
    with pytest.raises(FileExistsError):
        jdit.models.save_pretrained(module, params, tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["format"] == "jdit" and config["model"]["kv_compress_layers"] == [2]
    assert "scan_layers" not in config["model"]
    inputs = module.example_inputs(batch=2)
    apply = jax.jit(module.apply)
    ref = apply({"params": params}, **inputs)
    for scan in (False, True):
        loaded, p = jdit.models.from_pretrained(tmp_path / "ck", scan_layers=scan)
        # the same module back (scanned): its program is the one compiled for the reference
        assert (loaded == module) == scan
        fn = apply if scan else jax.jit(loaded.apply)
        np.testing.assert_array_equal(np.asarray(fn({"params": p}, **inputs)), np.asarray(ref))
    jdit.models.save_pretrained(module, params, tmp_path / "ck", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_convert_cli_from_official_pth(tmp_path, capsys):
    model = OfficialPixArt(depth=2, model_max_length=300, input_size=16, pe_interpolation=0.25)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.pth")
    code = cli_main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "out"), "--set",
                     "num_heads=4"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["pe_interpolation"] == 0.25 and report["model"]["num_heads"] == 4
    module, params = jdit.models.from_pretrained(tmp_path / "out")
    x = torch.randn(1, 4, 16, 16)
    t, y, mask = torch.tensor([5.0]), torch.randn(1, 3, 24), torch.ones(1, 3)
    with torch.no_grad():
        ref = model(x, t, y, mask).permute(0, 2, 3, 1).numpy()
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()),
                       jnp.asarray(t.numpy()), context=jnp.asarray(y.numpy()),
                       context_mask=jnp.asarray(mask.numpy()))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5 * np.abs(ref).max())


def test_config_values_of_the_wrong_type_are_refused_naming_the_key(tmp_path):
    # a diffusers config.json: a float head dimension is not truncated to an int
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "PixArtTransformer2DModel", "attention_head_dim": 72.5,
        "caption_channels": 16}))
    with pytest.raises(ValueError, match=re.escape(
            f"{folder / 'config.json'}: config key 'attention_head_dim' must be an integer, got 72.5")):
        jdit.models.from_pretrained(folder)
    (folder / "config.json").write_text('{"_class_name": "PixArtTransformer2DModel", "attenti')
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'config.json'} is not valid JSON")):
        jdit.models.from_pretrained(folder)
    # jdit's own fields: integral floats (as JSON may write them) become ints, others are refused
    assert jdit.models.build("dit", hidden_size=64.0, num_heads=4, depth=1).hidden_size == 64
    for field, value, kind in [("hidden_size", 64.5, "an integer"), ("depth", "2", "an integer"),
                               ("learn_sigma", 1, "true or false"), ("mlp_ratio", "4", "a number")]:
        with pytest.raises(ValueError, match=re.escape(f"dit config key {field!r} must be {kind}")):
            jdit.models.build("dit", **{field: value})
