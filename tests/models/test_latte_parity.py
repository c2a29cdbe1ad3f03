"""Latte against diffusers' LatteTransformer3DModel on small random models."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LatteTransformer3DModel
from flax import linen as nn

import jdit
from jdit.weights.latte import config_to_diffusers
from tests.helpers import randomize, rel_err

TOL = 1e-4
# The published layout (Latte-1's config.json) at toy size.
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
            num_layers=2, cross_attention_dim=32, attention_bias=True, sample_size=8,
            patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            caption_channels=16, video_length=4)


def make_diffusers(tmp_path, seed=0, **config):
    model = randomize(LatteTransformer3DModel(**{**TINY, **config}), seed)
    folder = tmp_path / f"latte_{seed}"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random learned-sigma Latte (4 frames) and its folder, shared by the tests."""
    return make_diffusers(tmp_path_factory.mktemp("latte"))


def inputs(b=2, frames=4, hw=(8, 8), caption_len=6, valid=(6, 3), seed=1, channels=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, channels, frames, *hw, generator=gen)  # diffusers: (B, C, T, H, W)
    t = torch.tensor([7.0, 612.5, 999.0][:b])
    ctx = torch.randn(b, caption_len, TINY["caption_channels"], generator=gen)
    mask = torch.zeros(b, caption_len)
    for i, n in enumerate(valid[:b]):
        mask[i, :n] = 1
    return x, t, ctx, mask


def run_diffusers(model, x, t, ctx, mask, temporal=True):
    """diffusers' Latte takes a caption mask only as a per-frame additive bias (B·T, 1, L):
    a (B, L) mask cannot be reshaped to its (B·T) batch."""
    bias = ((1.0 - mask)[:, None] * -10000.0).repeat_interleave(x.shape[2], dim=0)
    with torch.no_grad():
        out = model(x, t, ctx, encoder_attention_mask=bias,
                    enable_temporal_attentions=temporal).sample
    return out.permute(0, 2, 3, 4, 1).numpy()  # -> (B, T, H, W, C)


def run_jdit(module, params, x, t, ctx, mask, **kwargs):
    apply = jax.jit(module.apply, static_argnames=("temporal",))
    out = apply({"params": params}, jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy()),
                jnp.asarray(t.numpy()), context=jnp.asarray(ctx.numpy()),
                context_mask=jnp.asarray(mask.numpy()), **kwargs)
    return np.asarray(out)


def test_learned_sigma_padded_captions(tiny):
    model, folder = tiny
    module, params = jdit.models.from_pretrained(folder)
    assert isinstance(module, jdit.models.Latte) and module.learn_sigma
    assert module.video_length == 4 and module.depth == 2 and module.norm_eps == 1e-6
    x, t, ctx, mask = inputs()
    out = run_jdit(module, params, x, t, ctx, mask)
    assert out.shape == (2, 4, 8, 8, 8)
    assert rel_err(out, run_diffusers(model, x, t, ctx, mask)) <= TOL


def test_plain_output_non_square_and_interpolated_positions(tmp_path):
    # sample_size 128: diffusers scales the 2-D positions by 128 // 64 = 2
    model, folder = make_diffusers(tmp_path, seed=2, out_channels=None, sample_size=128,
                                   video_length=3, num_layers=1)
    module, params = jdit.models.from_pretrained(folder)
    assert not module.learn_sigma and module.pe_interpolation == 2.0
    x, t, ctx, mask = inputs(frames=3, hw=(6, 10), caption_len=5, valid=(2, 5))
    out = run_jdit(module, params, x, t, ctx, mask)
    assert out.shape == (2, 3, 6, 10, 4)
    assert rel_err(out, run_diffusers(model, x, t, ctx, mask)) <= TOL


def test_other_output_channels_a_frame_conditioned_model(tmp_path):
    # [x, known frames, mask] in (2 C + 1 = 7 channels), the C = 3 velocity channels out
    model, folder = make_diffusers(tmp_path, seed=3, in_channels=7, out_channels=3,
                                   num_layers=1)
    module, params = jdit.models.from_pretrained(folder)
    assert module.predict_channels == 3 and not module.learn_sigma
    x, t, ctx, mask = inputs(channels=7)
    out = run_jdit(module, params, x, t, ctx, mask)
    assert out.shape == (2, 4, 8, 8, 3)
    assert rel_err(out, run_diffusers(model, x, t, ctx, mask)) <= TOL


def test_fewer_frames_equal_a_model_built_for_that_length(tiny):
    # diffusers only runs T == video_length; a 2-frame clip here is the same weights with
    # video_length=2 (the temporal embedding is a buffer, not in the state dict)
    model, folder = tiny
    short = LatteTransformer3DModel(**{**TINY, "video_length": 2}).eval()
    short.load_state_dict(model.state_dict())
    module, params = jdit.models.from_pretrained(folder)
    x, t, ctx, mask = inputs(frames=2)
    assert rel_err(run_jdit(module, params, x, t, ctx, mask),
                   run_diffusers(short, x, t, ctx, mask)) <= TOL


@pytest.mark.parametrize("frames,temporal", [(1, True), (4, False)])
def test_one_frame_and_without_temporal_attention(tiny, frames, temporal):
    model, folder = tiny
    module, params = jdit.models.from_pretrained(folder)
    x, t, ctx, mask = inputs(frames=frames)
    out = run_jdit(module, params, x, t, ctx, mask, temporal=temporal)
    assert rel_err(out, run_diffusers(model, x, t, ctx, mask, temporal=temporal)) <= TOL


@pytest.mark.parametrize("layout", [dict(scan_layers=True), dict(scan_layers=True,
                                                                 remat_policy="dots")])
def test_scanned_and_rematerialised_layouts(tiny, layout):
    model, folder = tiny
    module, params = jdit.models.from_pretrained(folder, **layout)
    assert set(params) >= {"blocks_0_0", "blocks_1_1"}  # block 0 adds the frame embedding
    x, t, ctx, mask = inputs(b=1, frames=4, valid=(4,))
    assert rel_err(run_jdit(module, params, x, t, ctx, mask),
                   run_diffusers(model, x, t, ctx, mask)) <= TOL


def test_save_pretrained_round_trip_and_diffusers_config(tiny, tmp_path):
    model, folder = tiny
    module, params = jdit.models.from_pretrained(folder, scan_layers=True)
    jdit.models.save_pretrained(module, params, tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model"]["family"] == "latte" and config["model"]["video_length"] == 4
    loaded, p = jdit.models.from_pretrained(tmp_path / "ck")
    assert not loaded.scan_layers
    x, t, ctx, mask = inputs(b=1, frames=4, valid=(5,))
    np.testing.assert_allclose(run_jdit(loaded, p, x, t, ctx, mask),
                               run_jdit(module, params, x, t, ctx, mask), rtol=0, atol=1e-6)
    # the diffusers config jdit writes builds diffusers' model with the same weights
    cfg = config_to_diffusers(loaded)
    cfg.pop("_class_name")
    again = LatteTransformer3DModel(**cfg)
    again.load_state_dict(model.state_dict())  # strict: every name and shape
    fields = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert fields(again.config) == fields(model.config)


def test_preset_matches_latte1_parameter_count():
    latte1 = dict(TINY, num_attention_heads=16, attention_head_dim=72, num_layers=28,
                  cross_attention_dim=1152, caption_channels=4096, sample_size=64,
                  video_length=16)
    with torch.device("meta"):
        ref = LatteTransformer3DModel(**latte1)
    module = jdit.models.build(jdit.models.preset("latte_xl2_512"))
    shapes = jax.tree.leaves(jdit.models.param_shapes(module))
    assert sum(int(np.prod(s.shape)) for s in shapes) == sum(p.numel() for p in ref.parameters())
    facts = jdit.models.registry.PIPELINE_FACTS["latte_xl2_512"]
    assert facts["resolution"] // facts["vae_factor"] == module.input_size == 64
    assert facts["frames"] == module.video_length == 16


def test_ddim_sampling_of_a_video_matches_diffusers(tiny):
    """The existing solvers run on (B, T, H, W, C) latents: 3 DDIM steps, learned sigma
    dropped as LattePipeline does, against diffusers' DDIMScheduler on the torch model."""
    model, folder = tiny
    module, params = jdit.models.from_pretrained(folder)
    x, _, ctx, mask = inputs(frames=4)
    bias = ((1.0 - mask)[:, None] * -10000.0).repeat_interleave(4, dim=0)
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(3)
    latents = x.clone()
    with torch.no_grad():
        for step in scheduler.timesteps:
            out = model(latents, step.expand(2), ctx, encoder_attention_mask=bias).sample
            latents = scheduler.step(out.chunk(2, dim=1)[0], step, latents).prev_sample
    ref = latents.permute(0, 2, 3, 4, 1).numpy()

    def model_fn(z, t, p, c, m):
        return module.apply({"params": p}, z, t, context=c, context_mask=m)

    noise = jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy())
    got = jdit.sampling.sample(model_fn, noise, solver="ddim", num_steps=3,
                               schedule=jdit.diffusion.DDPMSchedule.linear(1000, 1e-4, 0.02),
                               prediction="epsilon",
                               args=(params, jnp.asarray(ctx.numpy()), jnp.asarray(mask.numpy())))
    assert got.shape == noise.shape
    assert rel_err(got, ref) <= TOL


class AddInput(nn.Module):
    """A stand-in for an injection: adds its block's input and a zero-initialised scale."""

    @nn.compact
    def __call__(self, x, layer):
        gate = self.param("gate", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               (None,)), (1,))
        return x + layer * (1.0 + gate)


@pytest.mark.parametrize("scan", [False, True])
def test_after_temporal_hook_runs_in_every_block(scan):
    base = jdit.models.build("latte", input_size=4, hidden_size=16, depth=2, num_heads=2,
                             caption_channels=8, video_length=2, scan_layers=scan)
    hooked = base.clone(after_temporal=AddInput)
    ex = base.example_inputs(batch=1)
    zeros = jnp.zeros((2, 1, 2, 4, 16))  # (depth, B, T, N, D)
    shapes = nn.meta.unbox(jax.eval_shape(
        lambda: hooked.init(jax.random.key(0), **ex, block_inputs=zeros))["params"])
    rng = np.random.default_rng(0)  # random weights everywhere, the hooks' gates zero
    both = jax.tree_util.tree_map_with_path(
        lambda path, s: np.zeros(s.shape, np.float32) if path[-1].key == "gate"
        else 0.1 * rng.standard_normal(s.shape).astype(np.float32), shapes)
    params = {k: {**v, "temporal": {n: w for n, w in v["temporal"].items() if n != "hook"}}
              if "temporal" in v else v for k, v in both.items()}
    assert all("hook" in both[k]["temporal"] for k in both if k.startswith("block"))
    plain = jax.jit(base.apply)({"params": params}, **ex)
    apply = jax.jit(hooked.apply)
    same = apply({"params": both}, **ex, block_inputs=zeros)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))
    for i in range(2):  # each block's hook sees its own slice
        moved = apply({"params": both}, **ex, block_inputs=zeros.at[i].set(1.0))
        assert not np.allclose(np.asarray(moved), np.asarray(plain))


BAD = jdit.models.build("latte", input_size=8, hidden_size=16, depth=1, num_heads=2,
                        caption_channels=8, video_length=3)


def good():
    return dict(x=jnp.zeros((2, 3, 8, 8, 4)), t=jnp.zeros((2,)), context=jnp.zeros((2, 5, 8)),
                context_mask=jnp.ones((2, 5)))


@pytest.mark.parametrize("change,message", [
    (dict(x=jnp.zeros((2, 8, 8, 4))), r"x must be video latents of shape \(B, T, H, W, 4\)"),
    (dict(x=jnp.zeros((2, 3, 4, 8, 8))), r"x must have 4 channels in the last axis"),
    (dict(x=jnp.zeros((2, 4, 8, 8, 4))), r"x has 4 frames; .* 1 to video_length=3 frames"),
    (dict(x=jnp.zeros((2, 0, 8, 8, 4))), r"x has 0 frames"),
    (dict(x=jnp.zeros((2, 3, 9, 8, 4))), r"multiples of patch_size 2, got 9x8"),
    (dict(t=jnp.zeros((2, 3))), r"t must have shape \(2,\), got \(2, 3\)"),
    (dict(context=jnp.zeros((2, 5, 16))), r"context must be text features of shape \(2, L, 8\)"),
    (dict(context_mask=jnp.ones((2, 3, 5))), r"context_mask must have shape \(2, 5\)"),
    (dict(temporal=jnp.array(True)), r"temporal must be a Python bool"),
])
def test_bad_inputs(change, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda: BAD.init(jax.random.key(0), **{**good(), **change}))


@pytest.mark.parametrize("change,message", [
    (dict(norm_type="layer_norm"), r"norm_type='layer_norm' is not supported"),
    (dict(activation_fn=None), r"activation_fn='geglu' is not supported"),
    (dict(out_channels=0), r"out_channels must be >= 1, got 0"),
    (dict(cross_attention_dim=None), r"cross_attention_dim None must equal the inner dim 32"),
    (dict(caption_channels=None), r"caption_channels is required"),
])
def test_unsupported_diffusers_configs(tmp_path, change, message):
    config = {**TINY, "_class_name": "LatteTransformer3DModel", **change}
    config = {k: v for k, v in config.items() if v is not None or k != "activation_fn"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        jdit.models.from_pretrained(tmp_path)


def test_a_lone_state_dict_file_is_refused(tiny, tmp_path):
    from safetensors.torch import save_file

    save_file(tiny[0].state_dict(), tmp_path / "latte.safetensors")
    with pytest.raises(ValueError, match="load the diffusers folder"):
        jdit.models.from_pretrained(tmp_path / "latte.safetensors")
