"""LI-DiT's refiners against a direct jnp transcription of the paper's description (values and
gradients), their zero-initialised start, and their place in PixArt and SANA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jdit
from jdit.nn import LOGICAL_AXES, TextRefiner, TextRefinerConfig, pack_contexts, perturbed
from jdit.nn.text_refiner import TokenRefiner
from tests.helpers import rel_err

B, T_WIDTH = 2, 24


def features(seed: int, length: int, width: int, valid: tuple[int, ...]):
    x = jax.random.normal(jax.random.key(seed), (B, length, width))
    mask = (jnp.arange(length)[None] < jnp.asarray(valid)[:, None]).astype(jnp.int32)
    return x, mask


# --- the transcription: every step written out with plain jnp on the parameter dict ----------

def linear(p, x, n_in=1):
    """x contracted with the kernel's first ``n_in`` axes, plus the bias."""
    k = p["kernel"]
    y = jnp.tensordot(x, k, axes=(list(range(x.ndim - n_in, x.ndim)), list(range(n_in))))
    return y + p["bias"]


def norm(x):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6)


def attention(q, k, v, allowed):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = jnp.where(allowed, logits, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)


def block(p, x, mask, c, causal, others=None, others_mask=None):
    mod = linear(p["modulation"]["linear"], jax.nn.silu(c)).reshape(B, 6, -1)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (mod[:, i:i + 1] for i in range(6))
    h = norm(x) * (1 + scale_a) + shift_a
    q = linear(p["q"], h)
    if others is None:
        kv_in, kv_mask = h, mask
    else:
        kv_in, kv_mask = norm(others), others_mask
    kv = linear(p["kv"], kv_in)
    lq, lk = q.shape[1], kv.shape[1]
    allowed = kv_mask.astype(bool)[:, None, None, :]
    if causal:
        allowed = allowed & (jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None])
    o = attention(q, kv[:, :, 0], kv[:, :, 1], allowed)
    x = x + gate_a * linear(p["out"], o, 2)
    h = norm(x) * (1 + scale_m) + shift_m
    h = linear(p["mlp"]["fc2"], jax.nn.gelu(linear(p["mlp"]["fc1"], h), approximate=True))
    return x + gate_m * h


def condition(p, x, mask, t_emb):
    mean = (x * mask[..., None]).sum(1) / mask.sum(1)[:, None]
    return linear(p["time_proj"], t_emb) + linear(p["pool_proj"], mean)


def token_refiner(p, x, mask, t_emb, depth, causal):
    x = linear(p["in_proj"], x)
    c = condition(p["condition"], x, mask, t_emb)
    for i in range(depth):
        x = block(p[f"block_{i}"], x, mask, c, causal)
    return x


def text_refiner(p, parts, t_emb, depth, causal, collaborative):
    xs = [token_refiner(p[f"encoder_{i}"], f, m, t_emb, depth, causal)
          for i, (f, m) in enumerate(parts)]
    ms = [m for _, m in parts]
    if len(xs) > 1 and collaborative:
        xs = [block(p[f"collaborative_{i}"], x, m,
                    condition(p[f"collaborative_condition_{i}"], x, m, t_emb), False,
                    jnp.concatenate([o for j, o in enumerate(xs) if j != i], 1),
                    jnp.concatenate([o for j, o in enumerate(ms) if j != i], 1))
              for i, (x, m) in enumerate(zip(xs, ms, strict=True))]
    return jnp.concatenate(xs, 1), jnp.concatenate(ms, 1)


CASES = {
    "one_causal": (dict(encoders=((20, None),), width=32, depth=2, causal=True),
                   [(20, 7, (7, 3))]),
    "two_collaborative": (dict(encoders=((20, 6), (12, 5)), width=32, depth=1),
                          [(20, 6, (6, 2)), (12, 5, (4, 5))]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_and_gradients_match_the_transcription(case):
    spec, shapes = CASES[case]
    cfg = TextRefinerConfig.from_dict(spec)
    parts = [features(i, n, w, valid) for i, (w, n, valid) in enumerate(shapes)]
    context, mask = pack_contexts([f for f, _ in parts], [m for _, m in parts])
    t_emb = jax.random.normal(jax.random.key(9), (B, T_WIDTH))
    module = TextRefiner(cfg, precision=jax.lax.Precision.HIGHEST)
    params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), context, mask, t_emb)["params"])
    params = perturbed(params, jax.random.key(1), 0.2)  # the gates away from zero

    def ours(p, ctx):
        return module.apply({"params": p}, ctx, mask, t_emb)[0]

    def reference(p, ctx):
        split, start = [], 0
        for (width, length, _), (_, m) in zip(shapes, parts, strict=True):
            split.append((ctx[:, start:start + length, :width], m))
            start += length
        with jax.default_matmul_precision("highest"):
            return text_refiner(p, split, t_emb, cfg.depth, cfg.causal, cfg.collaborative)[0]

    got, want = jax.jit(ours)(params, context), jax.jit(reference)(params, context)
    assert got.shape == (B, context.shape[1], cfg.width)
    assert rel_err(got, want) <= 1e-5
    valid = mask.astype(bool)  # padded tokens' own outputs are never read (masked as keys)

    def loss(fn):
        return lambda p, ctx: jnp.sum(jnp.where(valid[..., None], fn(p, ctx), 0.0) ** 2)

    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, context)
    g_ref = jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(params, context)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
        assert rel_err(a, b) <= 1e-4
    # every parameter is learned: a gradient reaches each of them
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_ours[0]))


def test_causal_and_bidirectional_differ_only_where_later_tokens_are_seen():
    x, mask = features(0, 7, 20, (7, 7))
    t_emb = jnp.ones((B, T_WIDTH))
    outs = {}
    for causal in (False, True):
        module = TokenRefiner(32, depth=1, causal=causal)
        p = perturbed(nn.meta.unbox(module.init(jax.random.key(0), x, mask, t_emb)["params"]),
                      jax.random.key(1), 0.2)
        outs[causal] = module.apply({"params": p}, x, mask, t_emb)
    # the last token sees everything either way; the first sees only itself when causal
    assert rel_err(outs[True][:, -1], outs[False][:, -1]) <= 1e-5
    assert rel_err(outs[True][:, 0], outs[False][:, 0]) > 1e-3


def test_zero_initialised_gates_leave_the_projected_features_unchanged():
    cfg = TextRefinerConfig.from_dict(dict(encoders=((20, 6), (12, 5)), width=32, depth=2))
    parts = [features(0, 6, 20, (6, 2)), features(1, 5, 12, (4, 5))]
    context, mask = pack_contexts([f for f, _ in parts], [m for _, m in parts])
    t_emb = jax.random.normal(jax.random.key(9), (B, T_WIDTH))
    module = TextRefiner(cfg)
    params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), context, mask, t_emb)["params"])
    out, out_mask = module.apply({"params": params}, context, mask, t_emb)
    projected = jnp.concatenate([linear(params[f"encoder_{i}"]["in_proj"], f)
                                 for i, (f, _) in enumerate(parts)], axis=1)
    np.testing.assert_allclose(out, projected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out_mask, mask)


def test_pixart_and_sana_take_a_text_refiner_from_their_config():
    refiner = dict(encoders=[[20, 6], [12, 5]], width=32, depth=1, num_heads=4)
    for family, extra in (("pixart", {}), ("sana", dict(cross_num_heads=2))):
        model = jdit.models.build(family, input_size=4, patch_size=1, in_channels=4,
                                  hidden_size=32, depth=2, num_heads=2, caption_channels=20,
                                  text_refiner=refiner, **extra)
        assert isinstance(model.text_refiner, TextRefinerConfig)
        arch = jdit.models.architecture(model)
        assert arch["text_refiner"]["encoders"] == [[20, 6], [12, 5]]
        assert jdit.models.build(arch) == model  # what checkpoints store builds it again
        boxed = jdit.nn.abstract_params(model, boxed=True)["text_refiner"]
        for path, leaf in jax.tree_util.tree_flatten_with_path(
                boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
            assert len(leaf.names) == len(leaf.value.shape), path
            assert set(leaf.names) - {None} <= set(LOGICAL_AXES), (path, leaf.names)
        params = jdit.nn.init_params(model, jax.random.key(0))
        inputs = model.example_inputs(batch=B)
        assert inputs["context"].shape == (B, 11, 20)
        out = jax.jit(model.apply)({"params": params}, **inputs)
        assert out.shape[:3] == (B, 4, 4) and bool(jnp.isfinite(out).all())
        # the DiT reads the refiner's width
        assert params["caption_projection"]["fc1"]["kernel"].shape[0] == 32


def test_bad_refiner_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match=r"feature widths \[20, 12\].*caption_channels is 16"):
        jdit.models.build("pixart", input_size=4, hidden_size=32, depth=1, num_heads=2,
                          caption_channels=16,
                          text_refiner=dict(encoders=[[20, 6], [12, 5]], width=32))
    with pytest.raises(ValueError, match="each needs its token count"):
        TextRefinerConfig.from_dict(dict(encoders=[[20], [12, 5]], width=32))
    with pytest.raises(ValueError, match="unknown keys"):
        TextRefinerConfig.from_dict(dict(encoders=[[20]], width=32, heads=4))
    cfg = TextRefinerConfig.from_dict(dict(encoders=[[20, 6], [12, 5]], width=32))
    module = TextRefiner(cfg)
    t_emb = jnp.zeros((B, T_WIDTH))
    with pytest.raises(ValueError, match="pack to 11, got 10"):
        module.init(jax.random.key(0), jnp.zeros((B, 10, 20)), jnp.ones((B, 10)), t_emb)
    with pytest.raises(ValueError, match=r"expected packed prompt features \(B, L, 20\)"):
        module.init(jax.random.key(0), jnp.zeros((B, 11, 12)), jnp.ones((B, 11)), t_emb)
