"""The benchmark code paths run (on tiny configurations; the figures come from `jdit bench`)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

import jdit
from jdit.benchmarks import compile_time, forward, sample, train

TINY = dict(depth=2, width=48, heads=4, latent=8, batch=2, caption_tokens=5, caption_channels=16)


def test_forward_benchmark_runs_and_checks_parity():
    result = forward.run(repeats=1, config=TINY, log=lambda s: None)
    assert result["max_rel_err"] <= 1e-4 and result["speedup"] > 0
    assert result["gflop_per_forward"] == forward.forward_flops(dict(forward.CONFIG, **TINY)) / 1e9


@pytest.mark.slow
def test_sample_benchmark_runs_without_recompiling():
    result = sample.run(repeats=1, num_steps=3, config=TINY, log=lambda s: None)
    assert result["recompiled_on_new_noise"] is False
    assert result["sample_s"] > 0 and result["forwards_s"] > 0


def test_control_benchmark_times_the_same_step_three_ways_and_the_base():
    from jdit.benchmarks import control

    result = control.run(repeats=1, calls=1, config=TINY, condition_latent=4,
                         log=lambda s: None)
    assert result["max_abs_diff"] <= 1e-4  # cached, uncached and once-per-step agree
    assert result["cached_vs_uncached"] > 0 and result["cached_vs_once_per_step"] > 0
    assert result["no_condition_step_s"] > 0 and result["cached_vs_no_condition"] > 0


def test_compile_benchmark_runs():
    result = compile_time.compile_seconds("pixart_sigma_xl2_256", scan=True)
    assert result["total_s"] > 0


@pytest.mark.slow
def test_train_benchmark_runs_and_checks_the_loss():
    result = train.run(repeats=1, steps=1, config=TINY, log=lambda s: None)
    assert result["first_loss_rel_err"] <= 1e-4 and result["speedup"] > 0
    # each library ran in its own process and reported its own ceiling and memory
    assert result["jax_matmul_gflops"] > 0 and result["torch_matmul_gflops"] > 0
    assert all(result["peak_rss_mb"][lib] > 50 for lib in ("jdit", "diffusers"))


def test_a_failing_benchmark_worker_reports_its_error():
    from jdit.benchmarks.isolated import run_worker

    with pytest.raises(RuntimeError, match="library must be jdit or diffusers"):
        run_worker("jdit.benchmarks.train_worker", ["numpy", "x", "y", 1, 1])


@pytest.mark.slow
def test_bars_benchmark_trains_evaluates_and_judges(tmp_path):
    import textwrap
    from pathlib import Path

    from jdit.benchmarks import bars

    real = Path(__file__).resolve().parents[1] / "configs" / "shapes_tiny.py"
    (tmp_path / "shapes_tiny.py").write_text(textwrap.dedent(f'''
        import importlib.util
        spec = importlib.util.spec_from_file_location("real", {str(real)!r})
        real = importlib.util.module_from_spec(spec); spec.loader.exec_module(real)
        def get_config():
            c = real.get_config()
            c.model.update(hidden_size=32, depth=1, num_heads=2, caption_channels=16)
            c.data.text_dim = 16
            c.train.update(batch_size=8, steps=3, sample_every=0)
            c.sample.steps = 2
            return c
    '''))
    result = bars.run(["shapes_tiny"], config_dir=tmp_path, workdir=tmp_path / "runs", seeds=[5])
    (r,) = result["results"]
    assert r["seed"] == 5 and (tmp_path / "runs" / "shapes_tiny_seed5" / "metrics.jsonl").exists()
    assert r["startup_seconds"] >= r["first_step_seconds"] > 0 and r["peak_rss_mb"] > 100
    assert result["summary"]["shapes_tiny"]["adherence_single_worst"] == \
        r["metrics"]["adherence_single"]
    assert r["metrics"]["step"] == 3 and r["metrics"]["num_single_images"] >= 200
    assert r["metrics"]["num_pair_prompts"] >= 200
    assert r["passed"]["train_seconds"] and not r["passed"]["adherence_single"]  # 3 steps
    assert result["all_passed"] is False
    with pytest.raises(ValueError, match="bars exist for"):
        bars.run(["imagenet"])


def test_bars_summary_gives_the_mean_and_the_worst_seed():
    from jdit.benchmarks import bars

    def one(seed, seconds, single, pair):
        return {"recipe": "shapes_tiny", "seed": seed, "train_seconds": seconds,
                "metrics": {"adherence_single": single, "adherence_pair": pair}}

    s = bars.summary([one(0, 500.0, 0.95, 0.80), one(1, 620.0, 0.91, 0.85),
                      one(2, 560.0, 0.93, 0.72)])["shapes_tiny"]
    assert s["train_seconds_worst"] == 620.0 and s["adherence_single_worst"] == 0.91
    assert s["adherence_pair_worst"] == 0.72
    assert abs(s["adherence_single_mean"] - 0.93) < 1e-9
    assert abs(s["train_seconds_mean"] - 560.0) < 1e-9


@pytest.mark.slow  # end to end (a training run)
def test_lit_benchmark_distils_and_judges_at_a_toy_size(tmp_path):
    """`jdit bench lit` (the LiT adherence comparison, minutes long) on a toy model: the
    student inherits every weight but attention's, trains, and both are evaluated alike."""
    from jdit.benchmarks import lit

    r = lit.run(teacher_steps=3, student_steps=2, batch_size=8, single_repeats=1,
                overrides=["model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                           "sample.steps=2"], workdir=tmp_path, log=lambda s: None)
    assert r["inherited"]["initialised"] and r["inherited"]["inherited"]
    assert all(p.split("/")[1] == "attn" for p in r["inherited"]["initialised"])
    assert not r["inherited"]["unused"]
    assert 0.0 <= r["student_adherence_single"] <= 1.0
    assert r["passed"]["teacher_learned"] is False and r["all_passed"] is False  # 3 steps


def test_attention_benchmark_runs_and_reports_growth():
    from jdit.benchmarks import attention

    result = attention.run(tokens=(64, 256), repeats=1, log=lambda s: None)
    assert [r["tokens"] for r in result["rows"]] == [64, 256]
    assert all(r["softmax_s"] > 0 and r["linear_s"] > 0 for r in result["rows"])
    assert result["linear_growth"]["tokens_ratio"] == 4.0


@pytest.mark.slow
def test_scaling_benchmark_runs_both_blocks():
    from jdit.benchmarks import scaling

    result = scaling.run(tokens=(64, 256), width=64, repeats=1, log=lambda s: None)
    assert [r["tokens"] for r in result["rows"]] == [64, 256]
    assert all(r["pixart_block_s"] > 0 and r["sana_block_s"] > 0 for r in result["rows"])
    assert result["sana_growth"]["tokens_ratio"] == 4.0


@pytest.mark.slow
def test_tiling_benchmark_reports_every_way():
    from jdit.benchmarks import tiling

    result = tiling.run(size=10, widths=(8, 16), tile=4, overlap=2, repeats=1,
                        log=lambda s: None)
    ways = result["ways"]
    assert set(ways) == {"untiled", "blended", "exact", "exact_store_latent_only"}
    assert ways["exact"]["max_abs_diff_vs_untiled"] < 1e-4
    assert ways["blended"]["max_abs_diff_vs_untiled"] > ways["exact"]["max_abs_diff_vs_untiled"]
    assert all(w["seconds"] > 0 for w in ways.values())


@pytest.mark.slow
def test_linear_shapes_recipe_trains_a_few_steps(tmp_path):
    """configs/shapes_tiny_linear.py (its bars are checked by `jdit bench bars`)."""
    from jdit.config import load_config
    from jdit.train.loop import train

    config = load_config("configs/shapes_tiny_linear.py")
    assert config.model.family == "sana" and config.diffusion.objective == "flow"
    config.train.update(batch_size=8, steps=2, sample_every=0, log_every=1)
    last = train(config, tmp_path / "run", quiet=True)
    assert last["loss"] > 0


@pytest.mark.slow
def test_pipeline_benchmark_runs_and_the_images_agree():
    from jdit.benchmarks import pipeline

    result = pipeline.run(repeats=1, runs=1, num_steps=2, width=16, log=lambda s: None)
    assert result["max_abs_image_difference"] <= 1e-3 and result["speedup"] > 0
    assert set(result["components_s"]["jdit"]) == {"t5", "step", "vae_decode"}


@pytest.mark.slow
def test_cache_benchmark_compares_the_cache_with_its_encoders():
    from jdit.benchmarks import cache

    result = cache.run(images=3, table=256, batch_size=1, widths=(8, 8, 8), t5_width=32,
                       max_length=8, repeats=1, log=lambda s: None)
    assert result["buckets"] == 3 and result["images"] == 3
    assert result["encoders_images_per_s"] > 0 and result["cache_images_per_s"] > 0
    assert result["cache_over_encoders"] == pytest.approx(
        result["cache_images_per_s"] / result["encoders_images_per_s"], rel=0.01)


@pytest.mark.slow  # two LMs and a DiT run trained, then evaluated
def test_llm_benchmark_trains_lms_and_a_collaborative_refiner_run_at_a_toy_size(tmp_path):
    """`jdit bench llm` (LI-DiT's claim, ~20 minutes) on a toy model: two tiny LMs trained and
    saved as transformers folders, a DiT run reading both through the collaborative refiner,
    evaluated with each pair object scored."""
    from jdit.benchmarks import llm

    r = llm.run(steps=2, lm_steps=3, batch_size=4, variants=["e_collaborative"], num_pairs=2,
                single_repeats=1, overrides=["model.hidden_size=32", "model.depth=1",
                                             "model.num_heads=2", "sample.steps=2"],
                workdir=tmp_path, log=lambda s: None)
    assert sorted(r["lms"]) == ["seed0", "seed1"]
    assert all(0 < m["heldout_loss"] < 10 for m in r["lms"].values())
    run = r["variants"]["e_collaborative"]
    assert {"adherence_single", "adherence_pair", "adherence_pair_first",
            "adherence_pair_second"} <= set(run)
    assert "claim_holds" not in r  # (b), (c) and (d) were not run
    config = json.loads((tmp_path / "e_collaborative" / "config.json").read_text())
    assert len(config["data"]["text_encoders"]) == 2
    assert config["model"]["text_refiner"]["encoders"] == [[64, 16], [64, 16]]
    with pytest.raises(ValueError, match="unknown variants"):
        llm.run(variants=["f_t5"])


def test_shapes_data_refuses_llm_encoders_the_model_does_not_fit(tmp_path):
    from jdit.benchmarks import llm
    from jdit.config import load_config
    from jdit.train.loop import Run

    llm.word_tokenizer(tmp_path / "lm")
    from jdit.text import LlamaEncoder
    from jdit.weights.llama import save_pretrained

    module = LlamaEncoder(vocab_size=60, **llm.LM)
    save_pretrained(tmp_path / "lm", jdit.nn.init_params(module, jax.random.key(0)), module)
    base = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.batch_size=2"]
    config = str(llm.CONFIG)
    one = [dict(path=str(tmp_path / "lm"), max_length=16, hidden_layer=-3)]

    def run_with(caption_channels, refiner, encoders):
        cfg = load_config(config, base + [f"model.caption_channels={caption_channels}"])
        cfg.data.text_encoders = encoders
        cfg.model.text_refiner = refiner
        return Run(cfg)

    run_with(64, None, one)  # the LM's 64-wide features fit the default model
    with pytest.raises(ValueError, match="features are 64 wide, the model expects 32"):
        run_with(32, None, one)
    with pytest.raises(ValueError, match="need the model's text_refiner"):
        run_with(64, None, one * 2)
    with pytest.raises(ValueError, match=r"text_refiner.encoders \[\(64, 16\), \(64, 12\)\] do"):
        run_with(64, dict(encoders=[[64, 16], [64, 12]], width=32), one * 2)


@pytest.mark.slow
def test_step_cache_benchmark_counts_blocks_and_times_every_cache():
    from jdit.benchmarks import step_cache

    r = step_cache.run(repeats=1, num_steps=4, batch=1, log=lambda s: None, config=dict(
        depth=3, width=32, heads=2, latent=8, caption_tokens=4, caption_channels=8))
    assert r["blocks"]["uncached"] == 4 * 3
    assert r["blocks"]["static_alternate"] == 2 * 3 + 2 * 1  # calls 1 and 3 reuse
    assert r["blocks"]["guidance_cache"] == 2 * 3 + 2 * 2  # half-batch calls: (3 + 1) // 2
    assert set(r["speedup"]) == set(r["seconds"]) and r["speedup"]["uncached"] == 1.0


@pytest.mark.slow
def test_fast_benchmark_tables_teacher_student_cache_and_diffusers(tmp_path):
    """`jdit bench fast` on toy runs: every row, the diffusers process on the exported teacher
    giving jdit's images, and the headline computed."""
    from jdit.benchmarks import fast
    from jdit.config import load_config
    from jdit.train.loop import train

    small = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2",
             "model.caption_channels=16", "data.text_dim=16", "train.batch_size=8",
             "train.log_every=1", "train.sample_every=0"]
    root = Path(__file__).resolve().parents[1] / "configs"
    train(load_config(root / "shapes_tiny.py", small + ["train.steps=3"]), tmp_path / "t",
          quiet=True)
    train(load_config(f"{root / 'shapes_tiny_lcm.py'}:{tmp_path / 't'}",
                      small + ["train.steps=2", "distill.grid_steps=10"]), tmp_path / "s",
          quiet=True)
    r = fast.run(str(tmp_path / "t"), str(tmp_path / "s"), images=4, repeats=1, num_pairs=4,
                 single_repeats=1, log=lambda s: None)
    assert [row["name"].split(",")[0] for row in r["rows"]] == ["teacher"] * 4 + ["student"] * 3
    assert all(row["seconds_per_image"] > 0 for row in r["rows"])
    assert r["diffusers"]["max_abs_diff_vs_jdit_20_steps"] < 1e-3  # the same pipeline
    assert r["best"] in {row["name"] for row in r["rows"]} and r["speedup_over_diffusers"] > 0


@pytest.mark.slow  # every ARLON stage trained a few steps, then long videos made and scored
def test_arlon_benchmark_trains_every_stage_and_scores_every_method(tmp_path):
    """`jdit bench arlon` (ARLON's claim, ~25 minutes) at a toy size: the stages reuse their
    saved parameters on a second run, every method is scored, the claim is judged."""
    import copy

    from jdit.benchmarks import arlon

    cfg = copy.deepcopy(arlon.EXPERIMENT)
    for stage in ("dit", "vq", "ar", "inject"):
        cfg[stage]["steps"] = 2
    cfg["dit"].update(hidden_size=32, depth=1)
    cfg.update(eval_videos=2, eval_frames=16)
    cfg["sample"]["steps"] = 1
    r = arlon.run(cfg, tmp_path, log=lambda m: None)
    methods = [k for k in r if isinstance(r[k], dict) and "identity" in r[k]]
    assert {"ground_truth", "a_chained", "b_arlon/inject", "b20_arlon_corrupted/inject",
            "oracle_plan/inject_uncertainty"} <= set(methods)
    assert r["ground_truth"]["identity"] == 1.0 and r["ground_truth"]["frames"] == 16
    assert set(r["claim"]) == {"inject", "inject_uncertainty"}
    assert isinstance(r["claim_holds"], bool)
    # a second run reads every stage back instead of training it (its evaluation is the same
    # code as above: not run again, to keep the suite short)
    params, stages = arlon.train_all(arlon.Experiment(cfg), tmp_path, lambda m: None)
    assert all(s == {"reused": True} for s in stages.values()) and len(stages) == 5
    assert set(params) == {"dit", "vq", "ar", "inject", "inject_uncertainty"}
    with pytest.raises(ValueError, match="unknown experiment key"):
        arlon._override(copy.deepcopy(arlon.EXPERIMENT), "dit.nope=1")


def test_arlon_video_dit_starts_as_the_image_model_on_every_frame():
    """from_image_model: with the temporal halves off, the video DiT is the image PixArt run on
    each frame (the known-frame channels ignored), as Latte starts from PixArt-α."""
    import jax.numpy as jnp
    import numpy as np

    from jdit.benchmarks.arlon import from_image_model
    from jdit.models import build
    from jdit.nn.init import init_params, perturbed
    from jdit.sampling.long_video import condition_frames

    dims = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                caption_channels=8, learn_sigma=False)
    image = build("pixart", in_channels=3, pe_interpolation=1.0, **dims)
    image_params = perturbed(init_params(image, jax.random.key(0)), jax.random.key(1), 0.05)
    video = build("latte", in_channels=7, predict_channels=3, video_length=4, **dims)
    params = from_image_model(init_params(video, jax.random.key(2)), image_params)
    x = jax.random.normal(jax.random.key(3), (2, 4, 8, 8, 3))
    known = jax.random.normal(jax.random.key(4), x.shape)
    ctx, t = jax.random.normal(jax.random.key(5), (2, 5, 8)), jnp.array([100.0, 700.0])
    out = video.apply({"params": params}, condition_frames(x, known, jnp.ones((2, 4))), t,
                      context=ctx, temporal=False)
    for f in range(4):
        ref = image.apply({"params": image_params}, x[:, f], t, context=ctx)
        np.testing.assert_allclose(np.asarray(out[:, f]), np.asarray(ref), atol=1e-5)
    with pytest.raises(ValueError, match="has shape"):
        from_image_model(params, init_params(build("pixart", in_channels=3, pe_interpolation=1.0,
                                                   **{**dims, "hidden_size": 16}),
                                             jax.random.key(0)))
