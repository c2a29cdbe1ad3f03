"""The benchmark code paths run (on tiny configurations; the figures come from `jdit bench`)."""

from __future__ import annotations

from jdit.benchmarks import compile_time, forward, sample, train

TINY = dict(depth=2, width=48, heads=4, latent=8, batch=2, caption_tokens=5, caption_channels=16)


def test_forward_benchmark_runs_and_checks_parity():
    result = forward.run(repeats=1, config=TINY, log=lambda s: None)
    assert result["max_rel_err"] <= 1e-4 and result["speedup"] > 0
    assert result["gflop_per_forward"] == forward.forward_flops(dict(forward.CONFIG, **TINY)) / 1e9


def test_sample_benchmark_runs_without_recompiling():
    result = sample.run(repeats=1, num_steps=3, config=TINY, log=lambda s: None)
    assert result["recompiled_on_new_noise"] is False
    assert result["sample_s"] > 0 and result["forwards_s"] > 0


def test_compile_benchmark_runs():
    result = compile_time.compile_seconds("pixart_sigma_xl2_256", scan=True)
    assert result["total_s"] > 0


def test_train_benchmark_runs_and_checks_the_loss():
    result = train.run(repeats=1, config=TINY, log=lambda s: None)
    assert result["first_loss_rel_err"] <= 1e-4 and result["speedup"] > 0
