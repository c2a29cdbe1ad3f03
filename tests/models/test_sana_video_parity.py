"""SANA-Video against diffusers' SanaVideoTransformer3DModel on small random models; the official
layout, checkpoints, bad input and sampling a video."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SanaVideoTransformer3DModel

import jdit
from jdit.weights import sana_video as weights
from jdit.weights.export import export_state_dict
from tests.helpers import randomize, rel_err

TOL = 1e-4
# head dim 16: rotary channels (t, h, w) = (8, 4, 4); cross-attention 2 x 12 (inner 24 != 32)
BASE = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
            num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=12,
            cross_attention_dim=32, caption_channels=16, mlp_ratio=2.0, sample_size=4,
            patch_size=(1, 2, 2))


def make_diffusers(tmp_path, seed=0, **config):
    # randomize overwrites every parameter, the zero-initialised ones (conv_temp, the output
    # projections) included, so a missed temporal conv or a zero head cannot pass
    model = randomize(SanaVideoTransformer3DModel(**{**BASE, **config}), seed)
    folder = tmp_path / f"sana_video_{seed}"
    model.save_pretrained(folder)
    return model, folder


def inputs(model, thw, caption_len, valid_lens, seed=1):
    gen = torch.Generator().manual_seed(seed)
    b = len(valid_lens)
    x = torch.randn(b, model.config.in_channels, *thw, generator=gen)
    t = torch.tensor([3.0, 517.5, 999.0][:b])
    ctx = torch.randn(b, caption_len, model.config.caption_channels, generator=gen)
    mask = torch.zeros(b, caption_len)
    for i, n in enumerate(valid_lens):
        mask[i, :n] = 1
    return x, t, ctx, mask


def to_bthwc(x) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 4, 1).numpy()


def reference(model, x, t, ctx, mask, **kw):
    with torch.no_grad():
        return to_bthwc(model(x, encoder_hidden_states=ctx, timestep=t,
                              encoder_attention_mask=mask, **kw).sample)


def ours(module, params, x, t, ctx, mask, **kw):
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(to_bthwc(x)),
                                jnp.asarray(t.numpy()), context=jnp.asarray(ctx.numpy()),
                                context_mask=jnp.asarray(mask.numpy()), **kw)
    return np.asarray(out)


@pytest.mark.parametrize("config, thw, valid", [
    (dict(), (3, 8, 6), [5, 2]),  # the published patching (1, 2, 2), non-square frames
    (dict(patch_size=(2, 2, 2), out_channels=6), (4, 4, 8), [3]),  # temporal patches
    (dict(qk_norm=None, attention_bias=True, patch_size=(1, 1, 1)), (2, 3, 5), [5, 1]),
])
def test_matches_diffusers_with_padded_captions(tmp_path, config, thw, valid):
    model, folder = make_diffusers(tmp_path, **config)
    args = inputs(model, thw, 5, valid)
    module, params = jdit.models.from_pretrained(folder)
    assert type(module).__name__ == "SanaVideo"
    assert module.qk_norm == (config.get("qk_norm", "") is not None)
    assert rel_err(ours(module, params, *args), reference(model, *args)) <= TOL


def test_per_frame_timesteps_match_diffusers_per_token_timesteps(tmp_path):
    """diffusers' image-to-video pipeline gives every token its own t (the first frame at 0);
    jdit takes one t per latent frame."""
    model, folder = make_diffusers(tmp_path, seed=2)
    x, _, ctx, mask = inputs(model, (3, 4, 6), 4, [4, 2])
    t = torch.tensor([[0.0, 400.0, 400.0], [0.0, 31.5, 999.0]])
    token_t = t[:, None, :, None, None].expand(2, 1, 3, 2, 3).contiguous()
    module, params = jdit.models.from_pretrained(folder)
    want = reference(model, x, token_t, ctx, mask)
    assert rel_err(ours(module, params, x, t, ctx, mask), want) <= TOL


def test_guidance_embedding(tmp_path):
    """jdit takes the guidance scale unscaled and embeds it × guidance_embeds_scale, as for
    SANA-Sprint (diffusers' model takes it pre-scaled)."""
    model, folder = make_diffusers(tmp_path, seed=3, guidance_embeds=True)
    x, t, ctx, mask = inputs(model, (2, 4, 4), 3, [3, 1])
    g = torch.tensor([4.5, 2.0])
    module, params = jdit.models.from_pretrained(folder)
    got = ours(module, params, x, t, ctx, mask, guidance=jnp.asarray(g.numpy()))
    assert rel_err(got, reference(model, x, t, ctx, mask, guidance=g * 0.1)) <= TOL
    with pytest.raises(ValueError, match="embeds the guidance scale"):
        ours(module, params, x, t, ctx, mask)


def official_from_diffusers(d: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The official key layout, rebuilt from a diffusers state dict (the inverse of diffusers'
    scripts/convert_sana_video_to_diffusers.py), with the buffers official files carry."""
    emb = "time_embed.emb.timestep_embedder"
    o = {"x_embedder.proj.weight": d["patch_embedding.weight"],
         "x_embedder.proj.bias": d["patch_embedding.bias"],
         "attention_y_norm.weight": d["caption_norm.weight"],
         "final_layer.scale_shift_table": d["scale_shift_table"],
         "y_embedder.y_embedding": torch.zeros(300, 16), "pos_embed": torch.zeros(1, 8, 32),
         "logvar_linear.weight": torch.zeros(1, 32), "logvar_linear.bias": torch.zeros(1)}
    for mine, theirs in (("t_embedder.mlp.0", f"{emb}.linear_1"),
                         ("t_embedder.mlp.2", f"{emb}.linear_2"), ("t_block.1", "time_embed.linear"),
                         ("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
                         ("y_embedder.y_proj.fc2", "caption_projection.linear_2"),
                         ("final_layer.linear", "proj_out")):
        for wb in ("weight", "bias"):
            o[f"{mine}.{wb}"] = d[f"{theirs}.{wb}"]
    for i in range(depth):
        s, b = f"transformer_blocks.{i}", f"blocks.{i}"
        o[f"{b}.scale_shift_table"] = d[f"{s}.scale_shift_table"]
        o[f"{b}.attn.qkv.weight"] = torch.cat([d[f"{s}.attn1.to_{n}.weight"] for n in "qkv"])
        o[f"{b}.mlp.t_conv.weight"] = d[f"{s}.ff.conv_temp.weight"]
        o[f"{b}.mlp.point_conv.conv.weight"] = d[f"{s}.ff.conv_point.weight"]
        for wb in ("weight", "bias"):
            o[f"{b}.attn.proj.{wb}"] = d[f"{s}.attn1.to_out.0.{wb}"]
            o[f"{b}.cross_attn.q_linear.{wb}"] = d[f"{s}.attn2.to_q.{wb}"]
            o[f"{b}.cross_attn.kv_linear.{wb}"] = torch.cat([d[f"{s}.attn2.to_{n}.{wb}"]
                                                             for n in "kv"])
            o[f"{b}.cross_attn.proj.{wb}"] = d[f"{s}.attn2.to_out.0.{wb}"]
            o[f"{b}.mlp.inverted_conv.conv.{wb}"] = d[f"{s}.ff.conv_inverted.{wb}"]
            o[f"{b}.mlp.depth_conv.conv.{wb}"] = d[f"{s}.ff.conv_depth.{wb}"]
        for a, theirs in (("attn", "attn1"), ("cross_attn", "attn2")):
            o[f"{b}.{a}.q_norm.weight"] = d[f"{s}.{theirs}.norm_q.weight"]
            o[f"{b}.{a}.k_norm.weight"] = d[f"{s}.{theirs}.norm_k.weight"]
    return o


def test_official_pth_layout(tmp_path):
    model, _ = make_diffusers(tmp_path, seed=4)
    path = tmp_path / "sana_video.pth"
    torch.save({"state_dict": official_from_diffusers(model.state_dict(), 2)}, path)
    args = inputs(model, (2, 4, 4), 4, [4, 3])
    # heads are not in the weights (the release's are 112 wide): this toy's are given
    module, params = jdit.models.from_pretrained(path, num_heads=2, cross_num_heads=2,
                                                 cross_head_dim=12)
    assert type(module).__name__ == "SanaVideo" and module.temporal_kernel == 3
    assert rel_err(ours(module, params, *args), reference(model, *args)) <= TOL


def test_checkpoint_round_trip_scan_and_export(tmp_path):
    model, folder = make_diffusers(tmp_path, seed=5)
    module, params = jdit.models.from_pretrained(folder)
    args = inputs(model, (2, 4, 4), 3, [3, 2])
    want = ours(module, params, *args)
    jdit.models.save_pretrained(module, params, tmp_path / "ck")
    for scan in (False, True):
        loaded, p = jdit.models.from_pretrained(tmp_path / "ck", scan_layers=scan,
                                                remat_policy="full" if scan else "none")
        assert jdit.models.architecture(loaded) == jdit.models.architecture(module)
        np.testing.assert_allclose(ours(loaded, p, *args), want, rtol=0, atol=1e-5)
    # the importer only rearranges: exporting gives back diffusers' state dict exactly
    exported = export_state_dict(weights.convert_diffusers, module, params)
    theirs = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(exported) == set(theirs)
    for k, v in theirs.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_preset_is_the_published_2b_architecture():
    module = jdit.models.build(jdit.models.preset("sana_video_2b_480p"))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jdit.models.param_shapes(module)))
    with torch.device("meta"):
        ref = SanaVideoTransformer3DModel(
            in_channels=16, out_channels=16, num_attention_heads=20, attention_head_dim=112,
            num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112,
            cross_attention_dim=2240, caption_channels=2304, mlp_ratio=3.0, sample_size=30,
            patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads")
    assert n == sum(p.numel() for p in ref.parameters()) == 2_056_862_144
    facts = jdit.models.registry.PIPELINE_FACTS["sana_video_2b_480p"]
    # the Wan VAE: 4x in time (the first frame alone), 8x in space; 480x832 px
    assert (facts["frames"] - 1) // facts["vae_time_factor"] + 1 == module.input_frames
    assert facts["resolution"] // facts["vae_factor"] == module.input_size
    assert facts["width"] // facts["vae_factor"] == module.input_width


def tiny(**kw):
    return jdit.models.build("sana_video", **{**dict(
        input_size=4, input_width=4, input_frames=2, in_channels=4, out_channels=4,
        hidden_size=32, depth=1, num_heads=2, cross_num_heads=2, cross_head_dim=8,
        caption_channels=8, temporal_patch_size=2), **kw})


def test_bad_input_errors():
    module = tiny()
    params = jdit.models.init_params(module, jax.random.key(0))
    good = module.example_inputs(batch=2)

    def call(**change):  # traced only: the errors come at trace time
        jax.eval_shape(module.apply, {"params": params}, **{**good, **change})

    call()  # the example inputs are accepted
    with pytest.raises(ValueError, match=r"latent frames T=3 must be a positive multiple of "
                                         r"temporal_patch_size 2"):
        call(x=jnp.zeros((2, 3, 4, 4, 4)))
    with pytest.raises(ValueError, match="multiples of patch_size 2, got 5x4"):
        call(x=jnp.zeros((2, 2, 5, 4, 4)))
    with pytest.raises(ValueError, match="must have 4 channels"):
        call(x=jnp.zeros((2, 2, 4, 4, 3)))
    with pytest.raises(ValueError, match=r"shape \(B, T, H, W, 4\), channels last"):
        call(x=jnp.zeros((2, 4, 4, 4)))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\) or \(2, 1\)"):
        call(t=jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="context must be text features"):
        call(context=jnp.zeros((2, 8, 5)))
    with pytest.raises(ValueError, match="guidance= is for models with guidance_embeds"):
        call(guidance=jnp.ones((2,)))
    with pytest.raises(ValueError, match="exceeds the rotary tables"):
        jax.eval_shape(tiny(rope_max_len=1).apply, {"params": params}, **good)
    with pytest.raises(ValueError, match="head dim 15 must be even"):
        tiny(hidden_size=30)
    with pytest.raises(ValueError, match="temporal_kernel must be 0"):
        tiny(temporal_kernel=2)


@pytest.mark.parametrize("cfg, match", [
    (dict(patch_size=(1, 2, 1)), "square patches"),
    (dict(patch_size=2), r"patch_size must be \(t, h, w\)"),
    (dict(norm_elementwise_affine=True), "norm_elementwise_affine"),
    (dict(cross_attention_dim=16), "cross_attention_dim must equal the inner dim 32"),
    (dict(qk_norm="rms_norm"), "qk_norm"),
])
def test_unsupported_diffusers_configs_are_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        weights.config_from_diffusers({**BASE, **cfg})


def test_flow_sampling_of_a_video():
    """The solvers are shape-agnostic: a few flow steps on (B, T, H, W, C) noise."""
    module = tiny(temporal_patch_size=1)
    params = jdit.models.init_params(module, jax.random.key(1))
    params = jax.tree.map(lambda a: a + 0.05, params)  # a non-zero output head
    ctx, mask = jnp.ones((2, 3, 8)), jnp.array([[1, 1, 0], [1, 0, 0]])

    def model_fn(x, t, params, ctx, mask):
        return module.apply({"params": params}, x, t, context=ctx, context_mask=mask)

    noise = jax.random.normal(jax.random.key(2), (2, 3, 4, 4, 4))
    for solver in ("euler", "dpm++2m"):
        out = jdit.sampling.sample(model_fn, noise, solver=solver, num_steps=3,
                                   schedule=jdit.diffusion.FlowSchedule(shift=8.0),
                                   prediction="flow", args=(params, ctx, mask))
        assert out.shape == noise.shape and bool(jnp.all(jnp.isfinite(out)))
        assert float(jnp.max(jnp.abs(out - noise))) > 1e-3


def test_rotary_linear_attention_chunk_by_chunk_is_block_causal():
    """The streaming form's core: chunks of frames through the existing cache with rotary
    angles give block-causal attention, each chunk seeing itself and all earlier ones
    (an explicit masked sum in numpy: rotated features above, un-rotated below)."""
    from jdit.nn.linear_attention import empty_cache, linear_attention_chunk
    from jdit.nn.rotary import rotary_grid, wan_axes_dim

    b, frames, hw, heads, d = 2, 4, 6, 2, 12
    q, k, v = jax.random.normal(jax.random.key(0), (3, b, frames * hw, heads, d))
    cos, sin = rotary_grid((frames, 2, 3), wan_axes_dim(d))
    cache, outs = empty_cache(b, heads, d), []
    for c in range(2):  # two chunks of two frames
        s = slice(c * 2 * hw, (c + 1) * 2 * hw)
        o, cache = linear_attention_chunk(q[:, s], k[:, s], v[:, s], cache,
                                          rotary=(cos[None, s], sin[None, s]))
        outs.append(o)
    got = np.asarray(jnp.concatenate(outs, axis=1))

    def rot(x):
        x = np.maximum(np.asarray(x, np.float64), 0)
        c, s_ = np.asarray(cos, np.float64)[None, :, None], np.asarray(sin, np.float64)[None, :, None]
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s_
        out[..., 1::2] = x[..., 0::2] * s_ + x[..., 1::2] * c
        return out

    chunk = np.arange(frames * hw) // (2 * hw)
    visible = chunk[None, :] <= chunk[:, None]  # (query, key)
    qr, kr = rot(q), rot(k)
    qf, kf = (np.maximum(np.asarray(a, np.float64), 0) for a in (q, k))
    num = np.einsum("bnhd,bmhd,nm,bmhe->bnhe", qr, kr, visible, np.asarray(v, np.float64))
    den = np.einsum("bnhd,bmhd,nm->bnh", qf, kf, visible)[..., None]
    assert rel_err(got, num / den) <= 1e-5


SHARDED = """
import json
import jax, jax.numpy as jnp
import jdit
from jdit.nn.stack import stack_params
from jdit.parallel.partition import Partitioner
m = jdit.models.build("sana_video", input_size=4, input_width=4, input_frames=4, in_channels=4,
                      out_channels=4, hidden_size=32, depth=2, num_heads=2, cross_num_heads=2,
                      cross_head_dim=8, caption_channels=8)
params = jax.tree.map(lambda a: a + 0.03, jdit.models.init_params(m, jax.random.key(0)))
x = jax.random.normal(jax.random.key(1), (2, 4, 4, 4, 4))
t, c = jnp.array([10.0, 500.0]), jax.random.normal(jax.random.key(2), (2, 3, 8))
mask = jnp.array([[1, 1, 0], [1, 0, 0]])
ref = m.apply({"params": params}, x, t, context=c, context_mask=mask)
for mesh, rules in ((dict(data=2, fsdp=1, tensor=2, context=2), "fsdp_tp"),
                    (dict(data=1, fsdp=2, tensor=1, context=4), "fsdp")):
    part = Partitioner.from_config(dict(mesh=mesh, rules=rules))
    for scan in (False, True):
        mm = m.clone(scan_layers=scan)
        p = stack_params(params, m.per_layer()) if scan else params
        with part.activate():
            p = jax.device_put(p, part.param_shardings(mm))
            out = jax.jit(mm.apply)({"params": p}, x, t, context=c, context_mask=mask)
        split = sum(len(a.sharding.device_set) > 1 and not a.sharding.is_fully_replicated
                    for a in jax.tree.leaves(p))
        print(json.dumps(dict(mesh=mesh, scan=scan, split=split, devices=len(jax.devices()),
                              rel=float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref))))))
"""


@pytest.mark.slow
def test_sharded_over_time_and_heads_matches_one_device():
    """8 simulated devices: frames split over `context`, heads over `tensor`, weights over
    `fsdp`; unscanned and scanned blocks give one device's output."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 4
    for r in results:
        assert r["devices"] == 8 and r["split"] > 0 and r["rel"] <= 1e-5, r
