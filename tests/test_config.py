"""Config files: every section's defaults in one place, overrides of omitted fields, typos
refused before anything is built or compiled."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import pytest

import jdit
from jdit.cli import main as cli_main
from jdit.config import DATA, SECTIONS, complete, load_config, parse_value, required, section
from jdit.train.loop import train
from jdit.train.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "configs" / "shapes_tiny.py"


def test_an_omitted_field_with_a_default_can_be_overridden():
    written = load_config(SHAPES, fill_defaults=False)
    omitted = {"model": "dtype", "train": "accumulate", "diffusion": "weighting",
               "optim": "eps", "distill": "teacher"}
    for name, key in omitted.items():
        assert key not in written.get(name, {}), (name, key)  # the file does not name them
    config = load_config(SHAPES, ["model.dtype=bfloat16", "train.accumulate=2",
                                  "diffusion.weighting=min_snr", "optim.eps=1e-6",
                                  "parallel.mesh.context=1", "model.scan_layers=True"])
    assert config.model.dtype == "bfloat16" and config.train.accumulate == 2
    assert config.diffusion.weighting == "min_snr" and config.optim.eps == 1e-6
    assert config.parallel.mesh.context == 1 and config.model.scan_layers is True
    module = jdit.models.build(config.model)
    assert module.dtype == jnp.bfloat16 and module.scan_layers
    # what the file says stays; the rest takes the one default
    assert config.train.steps == written.train.steps
    assert config.train.seed == SECTIONS["train"]["seed"]
    assert config.sample.solver == written.sample.solver


@pytest.mark.parametrize("override, named", [
    ("train.stepz=3", "'train.stepz'"),
    ("model.hidden_sise=3", "'model.hidden_sise'"),
    ("optimizer.lr=3", "'optimizer'"),
    ("parallel.mesh.pipeline=2", "'parallel.mesh.pipeline'"),
])
def test_a_typo_is_refused_naming_the_valid_keys(override, named):
    with pytest.raises(ValueError, match=f"unknown config key {named}") as e:
        load_config(SHAPES, [override])
    assert "keys here" in str(e.value)


def test_a_typo_on_the_command_line_fails_before_anything_is_built(tmp_path, monkeypatch, capsys):
    import jdit.train.loop as loop

    def never(*args, **kwargs):
        raise AssertionError("the run was started")

    monkeypatch.setattr(loop, "train", never)
    code = cli_main(["train", "--config", str(SHAPES), "--workdir", str(tmp_path / "run"),
                     "--config.train.stepz=3"])
    err = capsys.readouterr().err
    assert code == 1 and "jdit train: error: unknown config key 'train.stepz'" in err
    assert "'steps'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_sections_and_data_tasks_agree_with_the_code():
    assert set(DATA) == set(TASKS)
    for name, values in DATA.items():
        assert values["name"] == name
    with pytest.raises(ValueError, match="data.name must be one of"):
        section("data", {"name": "imagenet"})
    with pytest.raises(ValueError, match=r"unknown config keys \['optim.lr_decay'\]"):
        section("optim", {"lr": 1e-3, "lr_decay": 0.5})
    with pytest.raises(ValueError, match="unknown config sections"):
        complete({"model": {"family": "dit"}, "trainer": {}})
    # required keys are named together, the command line being the way to set them
    c = complete({"model": {"family": "dit"}, "data": {"name": "feature_cache"}, "train": {},
                  "optim": {}})
    with pytest.raises(ValueError, match=r"config keys \['data.path', 'train.steps', "
                                         r"'train.batch_size', 'optim.lr'\] must be set"):
        required(c)
    required(c, ["model.family"])  # only the keys asked for


def test_completion_is_idempotent_and_a_run_written_before_a_default_resumes(tmp_path):
    from jdit.train.loop import _check_same_config

    config = complete(load_config(SHAPES))
    assert complete(config) == config
    assert set(config) == {"model", "data", "diffusion", "optim", "train", "sample", "parallel",
                           "distill", "lora", "control"}
    # config.json of an older run: the file's sections as written, no defaults filled in
    older = load_config(SHAPES, fill_defaults=False).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(older))
    _check_same_config(tmp_path, json.loads(json.dumps(config)))  # same run: accepted
    changed = json.loads(json.dumps(config))
    changed["optim"]["lr"] = 0.5
    with pytest.raises(ValueError, match="holds a different config"):
        _check_same_config(tmp_path, changed)


def test_architecture_configs_hold_the_model_and_its_pipeline_facts():
    config = load_config(ROOT / "configs" / "pixart_sigma_xl2_1024.py",
                         ["pipeline.caption_length=120"])
    assert set(config) == {"model", "pipeline"}
    assert config.pipeline.caption_length == 120 and config.pipeline.latent_scale == 0.13025
    with pytest.raises(ValueError, match="unknown config key 'train'"):
        load_config(ROOT / "configs" / "pixart_sigma_xl2_1024.py", ["train.steps=3"])


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size must be an integer > 0, got 0"),
    ("train.steps=-5", "train.steps must be an integer > 0, got -5"),
    ("train.log_every=0", "train.log_every must be an integer > 0"),
    ("train.checkpoint_every=-1", "train.checkpoint_every must be an integer >= 0"),
    ("model.hidden_size=0", "model.hidden_size must be an integer > 0"),
    ("model.num_heads=2.5", "model.num_heads must be an integer > 0, got 2.5"),
    ("optim.lr=nan", "optim.lr must be a number > 0, got nan"),
    ("sample.guidance_scale=inf", "sample.guidance_scale must be a number >= 0, got inf"),
    ("train.seed=18446744073709551616", "train.seed must fit in 64 bits"),
])
def test_values_that_cannot_work_are_refused_naming_the_key(override, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(override.partition("=")[0])):
        load_config(SHAPES, [override])  # named: by the check, or as a value of the wrong type
    # and a config built in code is checked by the loop before anything is written
    config = load_config(SHAPES).to_dict()
    section, _, rest = override.partition(".")
    key, _, value = rest.partition("=")
    config[section][key] = parse_value(value)
    with pytest.raises(ValueError, match=re.escape(message)):
        train(config, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_command_line_counts_of_zero_are_refused_not_read_as_the_default(capsys):
    for argv in (["sample", "--workdir", "w", "--num", "0"], ["aot", "--batch", "0"],
                 ["sample", "--pretrained", "p", "--height", "-8"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 2
        assert "expected an integer >= 1" in capsys.readouterr().err
