"""CAME (jdit.train.came) against ``came_pytorch.CAME`` and a numpy transcription of Algorithm 1.

The reference package is optional (``pip install came-pytorch==0.1.3``): its tests are skipped
without it; the numpy transcription of the paper's Algorithm 1 (arXiv 2307.02047, written with
the paper's row/column *sums*, where the library uses means) always runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdit.train.came import ScaleByCameState, came, scale_by_came
from tests.helpers import rel_err

# Parameter shapes as jdit stores them: a bias, a scalar, a Dense kernel (in, out), a fused QKV
# kernel (D, 3, H, Dh), an attention output kernel (H, Dh, D) and a patch-embed conv (p, p, C, D).
SHAPES: dict[str, tuple[int, ...]] = {
    "bias": (24,),
    "scalar": (),
    "dense": (16, 24),
    "qkv": (16, 3, 4, 8),
    "out": (4, 8, 16),
    "conv": (2, 2, 3, 16),
}
STEPS = 20
TOL = 1e-5
# factor_axes giving PyTorch's statistics on jdit's layouts (see test_matches_came_pytorch_...).
TORCH_LAYOUT_AXES = {"bias": None, "scalar": None, "dense": None, "qkv": 1, "out": 2,
                     "conv": ((0,), (1,))}


def _problem(seed: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Random float32 parameters and STEPS gradients of varying scale (one all-zero step)."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = []
    for i in range(STEPS):
        scale = 0.0 if i == 7 else rng.uniform(1e-3, 10.0)
        grads.append({k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in SHAPES.items()})
    return params, grads


def _came_tx(lr: Any, wd: Any) -> optax.GradientTransformation:
    return came(lr, weight_decay=wd)


def _came_torch_layouts_tx(lr: Any, wd: Any) -> optax.GradientTransformation:
    return came(lr, weight_decay=wd, factor_axes=TORCH_LAYOUT_AXES)


def _clipped_came_tx(lr: Any, wd: Any) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(50.0), came(lr, weight_decay=wd))


def _multisteps_tx(lr: Any, wd: Any) -> optax.GradientTransformation:
    return optax.MultiSteps(_clipped_came_tx(lr, wd), every_k_schedule=2)


@functools.partial(jax.jit, static_argnums=0)
def _scan_steps(make_tx: Callable[..., optax.GradientTransformation], params: Any, grads: Any,
                lr: jax.Array, wd: jax.Array) -> tuple[Any, Any]:
    """All steps in one compiled program; lr and wd are traced, so configs share a compile."""
    tx = make_tx(lr, wd)

    def step(carry: tuple[Any, Any], g: Any) -> tuple[tuple[Any, Any], None]:
        p, state = carry
        updates, state = tx.update(g, state, p)
        return (optax.apply_updates(p, updates), state), None

    return jax.lax.scan(step, (params, tx.init(params)), grads)[0]


def _run_jdit(
    make_tx: Callable[..., optax.GradientTransformation], params: dict[str, np.ndarray],
    grads: list[dict[str, np.ndarray]], lr: float, wd: float = 0.0,
) -> tuple[dict[str, np.ndarray], Any]:
    stacked = jax.tree.map(lambda *g: np.stack(g), *grads)
    p, state = _scan_steps(make_tx, params, stacked, np.float32(lr), np.float32(wd))
    return jax.tree.map(np.asarray, p), state


def _assert_same_displacement(got: np.ndarray, ref: np.ndarray, start: np.ndarray) -> None:
    """``got - start`` matches ``ref - start`` to TOL, up to the float32 rounding of the stored
    parameters (half a spacing per step), which dominates when the steps are tiny."""
    moved, ref_moved = got.astype(np.float64) - start, ref.astype(np.float64) - start
    rounding = STEPS * np.spacing(np.float32(np.max(np.abs(start)) + np.max(np.abs(ref_moved))))
    err = np.max(np.abs(moved - ref_moved))
    assert err <= TOL * np.max(np.abs(ref_moved)) + rounding, (err, np.max(np.abs(ref_moved)))


def _came_state(opt_state: Any) -> ScaleByCameState:
    """The ScaleByCameState inside ``came(...)``'s chain state."""
    found = [s for s in opt_state if isinstance(s, ScaleByCameState)]
    assert len(found) == 1
    return found[0]


# --- came_pytorch parity -------------------------------------------------------------------------


def _run_torch(
    params: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]], lr: float, wd: float
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    torch = pytest.importorskip("torch")
    came_pytorch = pytest.importorskip("came_pytorch")
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt = came_pytorch.CAME(
        list(tparams.values()), lr=lr, weight_decay=wd,
        betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), clip_threshold=1.0,
    )
    for g in grads:
        for k, t in tparams.items():
            t.grad = torch.tensor(g[k])
        opt.step()
    out = {k: t.detach().numpy() for k, t in tparams.items()}
    states = {
        k: {n: v.numpy() for n, v in opt.state[t].items() if isinstance(v, torch.Tensor)}
        for k, t in tparams.items()
    }
    return out, states


# Our state field -> came_pytorch's state key.
TORCH_STATE = {"mu": "exp_avg", "v": "exp_avg_sq", "v_row": "exp_avg_sq_row",
               "v_col": "exp_avg_sq_col", "r_row": "exp_avg_res_row",
               "r_col": "exp_avg_res_col"}


@pytest.mark.parametrize("lr,wd", [(1e-2, 0.0), (2e-5, 0.0), (3e-3, 0.1)])
def test_matches_came_pytorch_same_layout(lr: float, wd: float) -> None:
    """Both libraries factor the last two axes of the same arrays: parameters and every state
    tensor agree after STEPS steps (lr 2e-5 / wd 0 is PixArt-Σ's setting)."""
    params, grads = _problem(seed=1)
    ref, ref_states = _run_torch(params, grads, lr, wd)
    got, opt_state = _run_jdit(_came_tx, params, grads, lr, wd)
    state = _came_state(opt_state)
    for k in SHAPES:
        assert rel_err(got[k], ref[k]) <= TOL, (k, rel_err(got[k], ref[k]))
        _assert_same_displacement(got[k], ref[k], params[k])
        for field, key in TORCH_STATE.items():
            if key in ref_states[k]:
                ours = np.asarray(getattr(state, field)[k])
                assert rel_err(ours, ref_states[k][key]) <= TOL, (k, field)


def test_matches_came_pytorch_torch_layouts() -> None:
    """``factor_axes`` reproduces PixArt's PyTorch statistics on jdit's layouts: came_pytorch gets
    the PyTorch tensors (Linear ``(out, in)``, conv ``(D, C, p, p)``), jdit its own layouts."""
    params, grads = _problem(seed=2)
    lr = 1e-2
    to_torch = {  # jdit layout -> PyTorch layout
        "bias": lambda x: x,
        "scalar": lambda x: x,
        "dense": lambda x: x.T,  # nn.Linear (out, in); default factoring is orientation-free
        "qkv": lambda x: x.reshape(x.shape[0], -1).T,  # nn.Linear (3·H·Dh, D)
        "out": lambda x: x.reshape(-1, x.shape[-1]).T,  # nn.Linear (D, H·Dh)
        "conv": lambda x: x.transpose(3, 2, 0, 1),  # nn.Conv2d (D, C, p, p), factored over (p, p)
    }
    t_params = {k: np.array(f(params[k]), order="C") for k, f in to_torch.items()}
    t_grads = [{k: np.array(f(g[k]), order="C") for k, f in to_torch.items()} for g in grads]
    ref, ref_states = _run_torch(t_params, t_grads, lr, 0.0)
    got, opt_state = _run_jdit(_came_torch_layouts_tx, params, grads, lr)
    mu = _came_state(opt_state).mu
    for k, f in to_torch.items():
        assert rel_err(f(got[k]), ref[k]) <= TOL, (k, rel_err(f(got[k]), ref[k]))
        assert rel_err(f(np.asarray(mu[k])), ref_states[k]["exp_avg"]) <= TOL, k
    # Factored statistics have the PyTorch sizes: rows + cols of the 2-D views.
    v_row, v_col = _came_state(opt_state).v_row, _came_state(opt_state).v_col
    assert v_row["qkv"].shape == (16,) and v_col["qkv"].shape == (96,)
    assert v_row["conv"].shape == (3, 16, 2) and v_col["conv"].shape == (3, 16, 2)


# --- numpy transcription of Algorithm 1 ----------------------------------------------------------


def _algorithm1(
    p: np.ndarray, grads: list[np.ndarray], lr: float, wd: float,
    b1: float = 0.9, b2: float = 0.999, b3: float = 0.9999,
    eps1: float = 1e-30, eps2: float = 1e-16, d: float = 1.0,
) -> np.ndarray:
    """Algorithm 1 in float64 with the paper's row/column sums; leading axes are batched."""
    p = p.astype(np.float64)
    factored = p.ndim >= 2
    m = np.zeros_like(p)
    if factored:
        r = np.zeros(p.shape[:-1])
        c = np.zeros(p.shape[:-2] + p.shape[-1:])
        big_r, big_c = np.zeros_like(r), np.zeros_like(c)
    else:
        v = np.zeros_like(p)

    def outer_over_total(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return rows[..., :, None] * cols[..., None, :] / rows.sum(-1)[..., None, None]

    for g in grads:
        g = g.astype(np.float64)
        if factored:
            r = b2 * r + (1 - b2) * (g**2 + eps1).sum(-1)
            c = b2 * c + (1 - b2) * (g**2 + eps1).sum(-2)
            v = outer_over_total(r, c)
        else:
            v = b2 * v + (1 - b2) * (g**2 + eps1)
        u = g / np.sqrt(v)
        u = u / max(1.0, np.sqrt(np.mean(u**2)) / d)
        m = b1 * m + (1 - b1) * u
        if factored:
            inst = (u - m) ** 2 + eps2
            big_r = b3 * big_r + (1 - b3) * inst.sum(-1)
            big_c = b3 * big_c + (1 - b3) * inst.sum(-2)
            step = m / np.sqrt(outer_over_total(big_r, big_c))
        else:
            step = m
        p = p - lr * wd * p - lr * step
    return p


@pytest.mark.parametrize("lr,wd", [(1e-2, 0.0), (3e-3, 0.1)])
def test_matches_algorithm1_transcription(lr: float, wd: float) -> None:
    params, grads = _problem(seed=3)
    got, _ = _run_jdit(_came_tx, params, grads, lr, wd)
    for k in SHAPES:
        ref = _algorithm1(params[k], [g[k] for g in grads], lr, wd)
        assert rel_err(got[k], ref) <= TOL, (k, rel_err(got[k], ref))
        _assert_same_displacement(got[k], ref, params[k])


# --- memory, composition, dtypes -----------------------------------------------------------------


def test_state_is_factored() -> None:
    params = {"block": {"mlp": {"kernel": jnp.zeros((64, 256)), "bias": jnp.zeros((256,))},
                        "qkv": jnp.zeros((64, 3, 4, 16))},
              "gain": jnp.zeros(())}
    state = scale_by_came().init(params)
    assert jax.tree.structure(state.mu) == jax.tree.structure(params)
    shapes = {f: jax.tree.map(lambda x: x.shape, getattr(state, f)) for f in state._fields}
    mlp = {f: s["block"]["mlp"]["kernel"] for f, s in shapes.items()}
    assert mlp == {"mu": (64, 256), "v_row": (64,), "v_col": (256,), "v": (1,),
                   "r_row": (64,), "r_col": (256,)}
    qkv = {f: s["block"]["qkv"] for f, s in shapes.items()}
    assert qkv == {"mu": (64, 3, 4, 16), "v_row": (64, 3, 4), "v_col": (64, 3, 16), "v": (1,),
                   "r_row": (64, 3, 4), "r_col": (64, 3, 16)}
    bias = {f: s["block"]["mlp"]["bias"] for f, s in shapes.items()}
    assert bias == {"mu": (256,), "v_row": (1,), "v_col": (1,), "v": (256,),
                    "r_row": (1,), "r_col": (1,)}
    assert shapes["v"]["gain"] == ()
    # Beyond the first moment, a factored matrix costs 2·(rows + cols) numbers.
    extra = sum(getattr(state, f)["block"]["mlp"]["kernel"].size
                for f in ("v_row", "v_col", "v", "r_row", "r_col"))
    assert extra == 2 * (64 + 256) + 1
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state))


def test_least_squares_converges() -> None:
    """Fits y = x·W + b with a cosine-decayed learning rate."""
    key_x, key_w, key_b = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (256, 12))
    params_true = {"w": jax.random.normal(key_w, (12, 6)), "b": jax.random.normal(key_b, (6,))}
    y = x @ params_true["w"] + params_true["b"]

    def loss(p: dict[str, jax.Array]) -> jax.Array:
        return jnp.mean(jnp.square(x @ p["w"] + p["b"] - y))

    tx = came(optax.cosine_decay_schedule(0.05, 600))

    @jax.jit
    def fit(p: Any) -> tuple[Any, jax.Array]:
        def step(carry: tuple[Any, Any], _: None) -> tuple[tuple[Any, Any], jax.Array]:
            p, s = carry
            value, g = jax.value_and_grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), value

        (p, _), values = jax.lax.scan(step, (p, tx.init(p)), length=600)
        return p, values[0]

    params, first = fit({"w": jnp.zeros((12, 6)), "b": jnp.zeros((6,))})
    final = loss(params)
    assert np.isfinite(final) and final < 1e-4 * first, (float(first), float(final))
    assert rel_err(params["w"], params_true["w"]) < 1e-2


def test_multisteps_and_chain() -> None:
    """optax.MultiSteps(came) over k micro-batches equals came on their mean gradient; the
    state round-trips through jit and tree utilities."""
    params, grads = _problem(seed=4)
    keep = ("bias", "qkv")  # two leaves keep the two compiles short
    params = {k: params[k] for k in keep}
    grads = [{k: g[k] for k in keep} for g in grads]
    got, _ = _run_jdit(_multisteps_tx, params, grads[:8], 1e-2, 0.05)
    mean_grads = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1])
                  for i in range(0, 8, 2)]
    ref, _ = _run_jdit(_clipped_came_tx, params, mean_grads, 1e-2, 0.05)
    for k in keep:
        assert rel_err(got[k], ref[k]) <= TOL, k


def test_bfloat16_params_keep_float32_state() -> None:
    params = {"w": jnp.ones((8, 4), jnp.bfloat16), "b": jnp.ones((4,), jnp.bfloat16)}
    tx = came(1e-2)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state))
    # A constant gradient: u = ±1 everywhere, m = 0.1, S = (0.9² ... ) -> every entry moves alike.
    assert np.all(np.asarray(updates["w"], np.float32) < 0)


def test_inject_hyperparams() -> None:
    """The learning rate can be read and changed from the state (for logging and schedules)."""
    params = {"w": jnp.ones((8, 4)), "b": jnp.ones((4,))}
    tx = optax.inject_hyperparams(came)(learning_rate=1e-2)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    plain, _ = jax.jit(came(1e-2).update)(grads, came(1e-2).init(params), params)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)
    for k in params:  # float32 hyperparameters: (1 - b2) differs from float64's in the 5th digit
        assert rel_err(updates[k], plain[k]) <= 1e-4, k


def test_zero_gradients_stay_finite() -> None:
    params = {"w": jnp.ones((8, 4)), "b": jnp.ones((4,)), "t": jnp.ones((2, 3, 4))}
    tx = came(1e-2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(3):
        updates, state = update(zeros, state, params)
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    updates, state = update(jax.tree.map(jnp.ones_like, params), state, params)
    for _ in range(3):
        updates, state = update(zeros, state, params)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((updates, state)))


def test_factor_axes_callable_and_validation() -> None:
    params = {"qkv": jnp.zeros((8, 3, 2, 4)), "b": jnp.zeros((4,))}
    by_tree = scale_by_came(factor_axes={"qkv": 1, "b": None}).init(params)
    by_fn = scale_by_came(factor_axes=lambda t: jax.tree.map(
        lambda x: 1 if x.ndim == 4 else None, t)).init(params)
    assert by_tree.v_row["qkv"].shape == by_fn.v_row["qkv"].shape == (8,)
    assert by_tree.v_col["qkv"].shape == by_fn.v_col["qkv"].shape == (24,)
    for bad in (0, 4, ((0,), (0,)), ((), (1,)), ((0,), (5,)), "rows"):
        with pytest.raises(ValueError, match="factor_axes"):
            scale_by_came(factor_axes={"qkv": bad, "b": None}).init(params)
    with pytest.raises(ValueError, match="factor_axes"):
        scale_by_came(factor_axes={"qkv": None, "b": 1}).init(params)
