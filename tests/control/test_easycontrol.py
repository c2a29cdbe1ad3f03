"""EasyControl (jdit.control): the attention pattern against a direct transcription with
explicit masks, the cache, "no condition = the base", and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jdit import control, lora
from jdit.lora.core import adapter_items, from_items
from jdit.models.pixart import PixArt, PixArtBlock
from jdit.models.sana import Sana, SanaBlock

D, HEADS = 32, 2
HD = D // HEADS


def _randomise(params, seed, std=0.2):
    leaves, tree = jax.tree.flatten(nn.meta.unbox(params))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [std * jax.random.normal(k, a.shape)
                                     for k, a in zip(keys, leaves, strict=True)])


def _adapters(params, seed, rank=4):
    # a model's blocks, or one block's own parameters (block-level tests)
    targets = ("attention",) if "attn" not in params else (r"attn/(qkv|out)/kernel",)
    ad = lora.init(params, lora.LoraConfig(rank=rank, alpha=6.0, targets=targets),
                   jax.random.PRNGKey(seed))
    # B is zero at init: make it random so the LoRA acts
    items = adapter_items(ad)
    return from_items({p: a.replace(b=0.3 * jax.random.normal(jax.random.PRNGKey(seed + i),
                                                                    a.b.shape))
                            for i, (p, a) in enumerate(items.items())})


# ------------------------------------------------------------------ the transcription (PixArt)

def _ln(x):
    m = x.mean(-1, keepdims=True)
    return (x - m) / jnp.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-6)


def _mods(p, t0):
    m = p["scale_shift_table"][None] + t0
    return [m[:, i:i + 1] for i in range(6)]


def _dense(p, x, n_in=1):
    k = p["kernel"]
    y = jnp.tensordot(x, k, axes=(list(range(x.ndim - n_in, x.ndim)), list(range(n_in))))
    return y + p["bias"]


def _mlp(p, x):
    return _dense(p["fc2"], jax.nn.gelu(_dense(p["fc1"], x), approximate=True))


def _joint_pixart_block(base, branches, x, conds, ctx, ctx_mask, t0, t0c, see_each_other=False):
    """One PixArt block over the joint sequence [image; condition 1; condition 2; ...] with an
    explicit attention mask: image rows see every key, condition i's rows only condition i's
    (``see_each_other``: every condition's); each condition's rows use its own (LoRA-merged)
    projections and timestep-0 modulation."""
    groups = [(base, x, t0)] + [(p, c, t0c) for p, c in zip(branches, conds, strict=True)]
    qs, ks, vs, mods = [], [], [], []
    for p, h, t in groups:
        m = _mods(p, t)
        mods.append(m)
        qkv = _dense(p["attn"]["qkv"], _ln(h) * (1 + m[1]) + m[0])
        qs.append(qkv[:, :, 0]), ks.append(qkv[:, :, 1]), vs.append(qkv[:, :, 2])
    lengths = [h.shape[1] for _, h, _ in groups]
    q, k, v = (jnp.concatenate(a, axis=1) for a in (qs, ks, vs))
    total = sum(lengths)
    mask = np.zeros((total, total), bool)
    mask[: lengths[0], :] = True
    start = lengths[0]
    for n in lengths[1:]:
        mask[start:start + n, start:start + n] = True
        start += n
    if see_each_other:
        mask[lengths[0]:, lengths[0]:] = True
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HD)
    weights = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    outs, start = [], 0
    for (p, h, _), m, n in zip(groups, mods, lengths, strict=True):
        a = _dense(p["attn"]["out"], o[:, start:start + n], n_in=2)
        start += n
        h = h + m[2] * a
        if p is base:  # only the image rows see the text
            cq = _dense(p["cross_attn"]["q"], h)
            ckv = _dense(p["cross_attn"]["kv"], ctx)
            lg = jnp.einsum("bqhd,bkhd->bhqk", cq, ckv[:, :, 0]) / np.sqrt(HD)
            lg = jnp.where(ctx_mask[:, None, None, :] > 0, lg, -jnp.inf)
            co = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(lg, -1), ckv[:, :, 1])
            h = h + _dense(p["cross_attn"]["out"], co, n_in=2)
        h = h + m[5] * _mlp(p["mlp"], _ln(h) * (1 + m[4]) + m[3])
        outs.append(h)
    return outs


def _pixart_block_setup(seed=0):
    blk = PixArtBlock(hidden_size=D, num_heads=HEADS, mlp_ratio=2.0, grid_hw=(4, 4))
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, 16, D))
    ctx = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, 5, D))
    ctx_mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    t0 = jax.random.normal(jax.random.PRNGKey(seed + 2), (2, 6, D))
    params = blk.init(jax.random.PRNGKey(3), x, ctx, ctx_mask, t0)["params"]
    return blk, _randomise(params, seed + 4), x, ctx, ctx_mask, t0


def _pixart_via_jdit(blk, base, branches, x, conds, ctx, ctx_mask, t0, t0c, see_each_other=False):
    cond_blk = blk.clone(branch="condition")
    parts = []
    for j, (p, c) in enumerate(zip(branches, conds, strict=True)):
        grid = int(np.sqrt(c.shape[1]))
        one = cond_blk.clone(grid_hw=(grid, grid))
        layer = None
        if see_each_other:  # the other conditions' keys and values at this block (its input)
            others = [one.clone(grid_hw=(int(np.sqrt(c2.shape[1])),) * 2).apply(
                {"params": p2}, c2, None, None, t0c)[1]
                for i, (p2, c2) in enumerate(zip(branches, conds, strict=True)) if i != j]
            layer = {"control": tuple(jnp.concatenate([o[i] for o in others], axis=1)
                                      for i in range(2))}
        c_out, kv = one.apply({"params": p}, c, None, None, t0c, layer)
        parts.append((c_out, kv))
    kv = tuple(jnp.concatenate([q[1][i] for q in parts], axis=1) for i in range(2))
    x_out, _ = blk.apply({"params": base}, x, ctx, ctx_mask, t0, {"control": kv})
    return [x_out] + [q[0] for q in parts]


def test_pixart_block_matches_the_explicit_mask_transcription_values_and_gradients():
    blk, base, x, ctx, ctx_mask, t0 = _pixart_block_setup()
    conds = [jax.random.normal(jax.random.PRNGKey(20), (2, 16, D)),
             jax.random.normal(jax.random.PRNGKey(21), (2, 4, D))]  # two sizes
    t0c = jax.random.normal(jax.random.PRNGKey(22), (2, 6, D))
    ads = [_adapters(base, 30), _adapters(base, 40)]
    scales = [1.0, 0.5]

    def run(fn, ads):
        branches = [lora.merge(base, a, s) for a, s in zip(ads, scales, strict=True)]
        return fn(branches)

    def joint(b):
        return _joint_pixart_block(base, b, x, conds, ctx, ctx_mask, t0, t0c)

    def ours(b):
        return _pixart_via_jdit(blk, base, b, x, conds, ctx, ctx_mask, t0, t0c)

    def loss(fn):
        return lambda ads: sum(jnp.sum(jnp.sin(o)) for o in run(fn, ads))

    # values and gradients of both in one compiled program (op by op takes several times longer)
    ref, got, g_ref, g_got = jax.jit(lambda a: (run(joint, a), run(ours, a),
                                                jax.grad(loss(joint))(a),
                                                jax.grad(loss(ours))(a)))(ads)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=2e-5)
    for r, g in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_got), strict=True):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_got)) > 1e-3


def test_the_variant_where_conditions_see_each_other_matches_its_transcription():
    blk, base, x, ctx, ctx_mask, t0 = _pixart_block_setup(1)
    conds = [jax.random.normal(jax.random.PRNGKey(23), (2, 16, D)),
             jax.random.normal(jax.random.PRNGKey(24), (2, 4, D))]
    t0c = jax.random.normal(jax.random.PRNGKey(25), (2, 6, D))
    branches = [lora.merge(base, _adapters(base, s), 1.0) for s in (31, 41)]
    ref = _joint_pixart_block(base, branches, x, conds, ctx, ctx_mask, t0, t0c, True)
    got = _pixart_via_jdit(blk, base, branches, x, conds, ctx, ctx_mask, t0, t0c, True)
    apart = _pixart_via_jdit(blk, base, branches, x, conds, ctx, ctx_mask, t0, t0c)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=2e-5)
    assert float(jnp.abs(apart[1] - got[1]).max()) > 1e-3  # the conditions' rows changed


def test_encode_attend_each_other_is_the_joint_fixed_point():
    m, params = _pixart()
    rng = np.random.default_rng(5)
    c1 = control.Condition(jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32),
                           _adapters(params, 50), 1.0)
    c2 = control.Condition(jnp.asarray(rng.normal(size=(2, 4, 4, 4)), jnp.float32),
                           _adapters(params, 60), 1.0)
    joint = control.encode(m, params, [c1, c2], attend_each_other=True)
    apart = control.encode(m, params, [c1, c2])
    assert joint[0].shape == apart[0].shape
    assert float(jnp.abs(joint[0] - apart[0]).max()) > 1e-4
    # one more round changes nothing: every block already saw the others' final keys
    n1 = 16  # condition 1: 8x8 latents, patch 2 -> 16 tokens, then condition 2's 4
    assert joint[0].shape[2] == n1 + 4
    peers_of = [tuple(a[:, :, n1:] for a in joint), tuple(a[:, :, :n1] for a in joint)]
    again = control.combine(m, [control.encode_one(m, params, c, peers=p)
                                for c, p in zip((c1, c2), peers_of, strict=True)])
    for a, b in zip(again, joint, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the transcription (SANA)

def _joint_linear_attention(q, k, v, mask):
    """Linear attention with an explicit (L, L) mask: out_i = Σ_j m_ij φ(q_i)·φ(k_j) v_j /
    Σ_j m_ij φ(q_i)·φ(k_j)."""
    q, k = jax.nn.relu(q), jax.nn.relu(k)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * mask
    num = jnp.einsum("bhqk,bkhe->bqhe", scores, v)
    return num / (jnp.einsum("bhqk->bqh", scores)[..., None] + 1e-15)


def test_sana_block_matches_the_explicit_mask_transcription():
    blk = SanaBlock(hidden_size=D, num_heads=HEADS, cross_num_heads=HEADS, mlp_ratio=2.0,
                    grid_hw=(4, 4))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, D))
    ctx = jax.random.normal(jax.random.PRNGKey(1), (2, 5, D))
    t0 = jax.random.normal(jax.random.PRNGKey(2), (2, 6, D))
    base = _randomise(blk.init(jax.random.PRNGKey(3), x, ctx, None, t0)["params"], 4)
    c = jax.random.normal(jax.random.PRNGKey(5), (2, 16, D))
    t0c = jax.random.normal(jax.random.PRNGKey(6), (2, 6, D))
    branch = lora.merge(base, _adapters(base, 7))

    # jdit: the condition's state added to the image's
    cblk = blk.clone(branch="condition")
    c_out, state = cblk.apply({"params": branch}, c, None, None, t0c)
    x_out, _ = blk.apply({"params": base}, x, ctx, None, t0, {"control": state})

    # transcription: the attention of the joint sequence under the mask, everything else as
    # the module computes it, captured by intercepting the attention call
    def qkv(p, h, t):
        m = _mods(p, t)
        y = jnp.einsum("bld,dthe->blthe", _ln(h) * (1 + m[1]) + m[0], p["attn"]["qkv"]["kernel"])
        return y[:, :, 0], y[:, :, 1], y[:, :, 2]

    qi, ki, vi = qkv(base, x, t0)
    qc, kc, vc = qkv(branch, c, t0c)
    mask = np.zeros((32, 32), np.float32)
    mask[:16, :] = 1.0
    mask[16:, 16:] = 1.0
    o = _joint_linear_attention(jnp.concatenate([qi, qc], 1), jnp.concatenate([ki, kc], 1),
                                jnp.concatenate([vi, vc], 1), mask)
    o_img = jnp.einsum("blhe,hed->bld", o[:, :16], base["attn"]["out"]["kernel"]) + \
        base["attn"]["out"]["bias"]
    o_cond = jnp.einsum("blhe,hed->bld", o[:, 16:], branch["attn"]["out"]["kernel"]) + \
        branch["attn"]["out"]["bias"]

    from jdit.nn.linear_attention import LinearSelfAttention

    seen = []

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, LinearSelfAttention) and context.method_name == "__call__":
            seen.append(out[0] if isinstance(out, tuple) else out)
        return out

    with nn.intercept_methods(capture):
        blk.apply({"params": base}, x, ctx, None, t0, {"control": state})
        cblk.apply({"params": branch}, c, None, None, t0c)
    got = seen
    assert len(got) == 2
    np.testing.assert_allclose(got[0], o_img, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(got[1], o_cond, atol=2e-5, rtol=1e-4)
    assert x_out.shape == x.shape and c_out.shape == c.shape


# ------------------------------------------------------------------ the models

def _pixart(scan=False, std=0.2):
    m = PixArt(input_size=8, patch_size=2, in_channels=4, hidden_size=D, depth=3,
               num_heads=HEADS, caption_channels=16, learn_sigma=False, scan_layers=scan)
    params = _randomise(m.init(jax.random.PRNGKey(0), **m.example_inputs(2))["params"], 1, std)
    return m, params


def _inputs():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4))
    ctx = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 16))
    return x, jnp.array([100.0, 700.0]), ctx, jnp.array([[1, 1, 0, 0, 0], [1] * 5])


@pytest.mark.parametrize("scan", [False, True])
def test_conditions_never_see_each_other_and_combine_side_by_side(scan):
    m, params = _pixart(scan)
    c1 = control.Condition(jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 4)),
                           _adapters(params, 10))
    c2 = control.Condition(jax.random.normal(jax.random.PRNGKey(6), (2, 4, 4, 4)),
                           _adapters(params, 20), 0.5)
    k, v = control.encode(m, params, [c1, c2])
    assert k.shape == (3, 2, 16 + 4, HEADS, HD)
    k1, _ = control.encode(m, params, c1)
    other = control.Condition(c2.latents * 3.0 + 1.0, c2.adapters)
    k_other, _ = control.encode(m, params, [c1, other])
    np.testing.assert_array_equal(k[:, :, :16], k1)  # c1's part ignores c2 ...
    np.testing.assert_array_equal(k_other[:, :, :16], k1)  # ... whatever c2 is
    assert not np.allclose(k_other[:, :, 16:], k[:, :, 16:])
    x, t, ctx, mask = _inputs()
    out = m.apply({"params": params}, x, t, ctx, mask, control=(k, v))
    assert not np.allclose(out, m.apply({"params": params}, x, t, ctx, mask))


def test_sampling_with_the_cache_equals_recomputing_the_condition_every_step():
    from jdit.sampling import ClassifierFreeGuidance, sample

    m, params = _pixart(std=0.05)  # weights of a trained model's size: samples of order 1
    c = control.Condition(jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 4)),
                          _adapters(params, 10))
    x, _, ctx, mask = _inputs()
    ctx2, mask2 = jnp.concatenate([0 * ctx, ctx]), jnp.concatenate([mask, mask])

    def cached(x2, t2, p, ctx2, mask2, cache2):
        return m.apply({"params": p}, x2, t2, ctx2, mask2, control=cache2)

    def recomputed(x2, t2, p, ctx2, mask2):  # the branch run again at every step, both halves
        c2 = control.Condition(jnp.concatenate([c.latents] * 2), c.adapters)
        return m.apply({"params": p}, x2, t2, ctx2, mask2, control=control.encode(m, p, c2))

    from jdit.diffusion import FlowSchedule

    run = dict(solver="euler", num_steps=4, prediction="flow", schedule=FlowSchedule(3.0))
    cache = control.repeat(control.encode(m, params, c), 2)
    a = jax.jit(lambda p: sample(ClassifierFreeGuidance(cached), x,
                                 args=(jnp.float32(3.0), p, ctx2, mask2, cache), **run))(params)
    b = jax.jit(lambda p: sample(ClassifierFreeGuidance(recomputed), x,
                                 args=(jnp.float32(3.0), p, ctx2, mask2), **run))(params)
    assert float(jnp.abs(a).max()) < 10.0
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_sana_conditions_add_states():
    m = Sana(input_size=8, patch_size=1, in_channels=4, out_channels=4, hidden_size=D, depth=2,
             num_heads=HEADS, cross_num_heads=HEADS, caption_channels=16)
    params = _randomise(m.init(jax.random.PRNGKey(0), **m.example_inputs(2))["params"], 1)
    c1 = control.Condition(jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 4)),
                           _adapters(params, 10))
    c2 = control.Condition(jax.random.normal(jax.random.PRNGKey(6), (2, 4, 4, 4)),
                           _adapters(params, 20))
    s, z = control.encode(m, params, [c1, c2])
    assert s.shape == (2, 2, HEADS, HD, HD) and z.shape == (2, 2, HEADS, HD)  # fixed size
    s1, z1 = control.encode(m, params, c1)
    s2, z2 = control.encode(m, params, c2)
    np.testing.assert_allclose(s, s1 + s2, rtol=1e-6)
    x, t, ctx, mask = _inputs()
    out = m.apply({"params": params}, x, t, ctx, mask, control=(s, z))
    assert out.shape == x.shape and not np.allclose(out, m.apply({"params": params}, x, t, ctx,
                                                                 mask))


def test_bad_control_input_is_refused_clearly():
    m, params = _pixart()
    x, t, ctx, mask = _inputs()
    with pytest.raises(ValueError, match="channels"):
        control.encode(m, params, control.Condition(jnp.zeros((2, 8, 8, 3))))
    with pytest.raises(ValueError, match="multiples of patch_size"):
        control.encode(m, params, control.Condition(jnp.zeros((2, 7, 7, 4))))
    with pytest.raises(ValueError, match="control arrays must have shape"):
        m.apply({"params": params}, x, t, ctx, mask,
                control=(jnp.zeros((2, 2, 4, HEADS, HD)),) * 2)  # depth 2, the model has 3
    with pytest.raises(ValueError, match="do not fit"):
        other = PixArt(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3,
                       num_heads=HEADS, caption_channels=16, learn_sigma=False)
        wrong = nn.meta.unbox(other.init(jax.random.PRNGKey(0),
                                         **other.example_inputs(1))["params"])
        control.encode(m, params, control.Condition(jnp.zeros((2, 8, 8, 4)),
                                                    _adapters(wrong, 1)))
