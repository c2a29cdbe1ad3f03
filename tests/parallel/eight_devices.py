"""Runs on 8 simulated CPU devices (started by test_sharding.py in a fresh process, since the
device count is fixed when jax starts: ``python -m tests.parallel.eight_devices CHECK`` from the
repository root). Prints one JSON line of measurements per check. Pytrees are compared with
``norm_rel_err`` (per array it can be larger for arrays that start at zero: Adam's g / sqrt(v)
turns float reassociation in near-zero gradients into update differences of order lr)."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jdit.config import load_config  # noqa: E402
from jdit.nn import perturbed  # noqa: E402
from jdit.train.checkpoint import Checkpointer  # noqa: E402
from jdit.train.loop import Run  # noqa: E402
from tests.helpers import norm_rel_err  # noqa: E402

CONFIG = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                  "shapes_tiny.py"),
                     ["train.batch_size=16", "model.hidden_size=64", "model.depth=2",
                      "train.steps=10", "optim.warmup_steps=2"])
MESHES = [({"data": 8, "fsdp": 1, "tensor": 1}, "dp"), ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"),
          ({"data": 1, "fsdp": 4, "tensor": 2}, "fsdp_tp"), ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
          # sequence parallel: 64 image tokens split 4 ways, keys and values gathered
          ({"data": 2, "fsdp": 1, "tensor": 1, "context": 4}, "fsdp")]


def make_run(mesh: dict, rules: str, devices=None) -> Run:
    c = CONFIG.to_dict()
    c["parallel"] = {"mesh": mesh, "rules": rules}
    return Run(c, devices=devices)


def train(run: Run, steps: int = 3):
    null = run.task.null()
    state = run.sharded_init()
    step = run.jit_train_step((null["context"], null["context_mask"]))
    losses = []
    for i in range(steps):
        with run.partitioner.activate():
            state, metrics = step(state, run.batch(i))
        losses.append(float(metrics["loss"]))
    return state, losses


def sharded_leaves(state) -> int:
    return sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state))


def check_training() -> None:
    ref_state, ref_losses = train(make_run({"data": 1}, "dp", jax.devices()[:1]))
    ref = jax.device_get(ref_state)
    for mesh, rules in MESHES:
        run = make_run(mesh, rules)
        state, losses = train(run)
        qkv = state.params["block_0"]["attn"]["qkv"]["kernel"]
        print(json.dumps({
            "check": "training", "mesh": mesh, "rules": rules, "devices": len(qkv.devices()),
            "loss_rel": float(np.max(np.abs(np.subtract(losses, ref_losses)) / np.abs(ref_losses))),
            "params_rel": norm_rel_err(state.params, ref.params), "ema_rel": norm_rel_err(state.ema_params, ref.ema_params),
            "opt_rel": norm_rel_err(state.opt_state, ref.opt_state),
            "qkv_spec": [None if s is None else s if isinstance(s, str) else list(s)
                         for s in qkv.sharding.spec],
            "sharded_leaves": sharded_leaves(state)}), flush=True)


def check_sampling() -> None:
    single = make_run({"data": 1}, "dp", jax.devices()[:1])
    # Random weights everywhere (the zero-initialised output layers would make the model 0).
    params = single.sharded_init().params
    params = perturbed(params, jax.random.PRNGKey(7))
    prompts = [single.task.shapes.caption(p) for p in single.task.shapes.prompts("single", "heldout")[:8]]
    cond = single.task.encode(prompts)
    ref = single.generate(params, cond, seed=3, num_steps=4)
    for mesh, rules in [MESHES[i] for i in (0, 1, 4)]:
        run = make_run(mesh, rules)
        sharded_params = jax.device_put(jax.device_get(params), run.state_shardings().params)
        out = run.generate(sharded_params, cond, seed=3, num_steps=4)
        print(json.dumps({"check": "sampling", "mesh": mesh, "rules": rules,
                          "max_abs": float(np.max(np.abs(out - ref))),
                          "ref_std": float(np.std(ref))}), flush=True)


def check_checkpoints() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        saver = make_run({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp")
        state, _ = train(saver, steps=2)
        ckpt = Checkpointer(tmp, every=1, async_save=True)
        ckpt.save(2, state, {"data_index": 2, "step": 2})
        ckpt.close()
        saved = jax.device_get(state)
        for mesh, rules, devices in (({"data": 1, "fsdp": 4, "tensor": 1}, "fsdp", jax.devices()[:4]),
                                     ({"data": 1}, "dp", jax.devices()[:1])):
            run = make_run(mesh, rules, devices)
            reader = Checkpointer(tmp, every=0, read_only=True)
            restored, meta = reader.restore(run.abstract_state())
            reader.close()
            qkv = restored.params["block_0"]["attn"]["qkv"]["kernel"]
            print(json.dumps({
                "check": "checkpoint", "mesh": mesh, "devices": len(qkv.devices()),
                "max_abs": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                               for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved),
                                               strict=True)),
                "sharded_leaves": sharded_leaves(restored), "step": meta["step"]}), flush=True)


def check_pallas() -> None:
    """The Pallas attention kernels inside shard_map (interpreted on CPU) under sharded meshes,
    against the XLA attention on one device: loss and gradients of a small PixArt-Σ-style model
    (KV-compressed self-attention, masked cross-attention)."""
    from jdit.models import build
    from jdit.parallel import Partitioner

    cfg = dict(family="pixart", input_size=8, patch_size=2, in_channels=4, hidden_size=32,
               depth=2, num_heads=2, caption_channels=16, learn_sigma=False, kv_compress="conv",
               kv_compress_layers=(1,), kv_compress_ratio=2)
    xla, pallas = build(cfg), build({**cfg, "attention_impl": "pallas"})
    key = jax.random.PRNGKey(1)
    inp = xla.example_inputs(batch=4, caption_length=7)
    inp.update(x=jax.random.normal(key, inp["x"].shape), t=jnp.linspace(10.0, 900.0, 4),
               context=jax.random.normal(key, inp["context"].shape),
               context_mask=jnp.array([[1] * 7, [1] * 3 + [0] * 4] * 2))
    params = perturbed(xla.init(key, **inp), key)

    def loss(m, p, batch):
        return jnp.mean(m.apply(p, **batch) ** 2)

    ref_loss, ref_grads = jax.value_and_grad(lambda p: loss(xla, p, inp))(params)
    for mesh, rules in ((({"data": 2, "fsdp": 2, "tensor": 2}), "fsdp_tp"),
                        ({"data": 2, "fsdp": 1, "tensor": 1, "context": 4}, "fsdp")):
        part = Partitioner.from_config({"mesh": mesh, "rules": rules})
        with part.activate():
            value, grads = jax.jit(jax.value_and_grad(lambda p, b: loss(pallas, p, b)))(params, inp)
            text = jax.jit(lambda p, b: pallas.apply(p, **b)).lower(params, inp).as_text()
        print(json.dumps({"check": "pallas", "mesh": mesh, "rules": rules,
                          "loss_rel": abs(float(value) - float(ref_loss)) / float(ref_loss),
                          "grads_rel": norm_rel_err(grads, ref_grads),
                          "shard_map": "shard_map" in text or "manual" in text}), flush=True)


def check_lora() -> None:
    """A LoRA run: the adapters shard by the rules of the kernels they adapt (A like the
    kernel's input axes, B like its output axes), the base by the model's; losses and adapters
    equal one device's."""
    from jdit import lora
    from jdit.models import build, save_pretrained
    from jdit.nn.init import init_params

    tmp = tempfile.mkdtemp()
    module = build(CONFIG.to_dict()["model"])
    save_pretrained(module, perturbed(init_params(module, jax.random.key(0)), jax.random.key(1)),
                    f"{tmp}/base")

    def lora_run(mesh: dict, rules: str, devices=None) -> Run:
        c = CONFIG.to_dict()
        c["parallel"] = {"mesh": mesh, "rules": rules}
        c["train"]["init_from"] = f"{tmp}/base"
        c["lora"] = {"rank": 4, "targets": ["attention", "cross_attention", "mlp"]}
        return Run(c, devices=devices)

    def steps(run: Run, n: int = 3):
        null = run.task.null()
        state = run.sharded_init()
        step = run.jit_train_step((null["context"], null["context_mask"]))
        losses = []
        for i in range(n):
            with run.partitioner.activate():
                state, metrics = step(state, run.batch(i), *run.step_args)
            losses.append(float(metrics["loss"]))
        return state, losses

    ref_state, ref_losses = steps(lora_run({"data": 1}, "dp", jax.devices()[:1]))
    ref = jax.device_get(ref_state)
    for mesh, rules in [({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
                        ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp")]:
        run = lora_run(mesh, rules)
        state, losses = steps(run)
        qkv = lora.adapter_items(state.params)["block_0/attn/qkv"]
        out = lora.adapter_items(state.params)["block_0/attn/out"]

        def spec(x):
            return [None if s is None else s if isinstance(s, str) else list(s)
                    for s in x.sharding.spec]

        print(json.dumps({
            "check": "lora", "mesh": mesh, "rules": rules,
            "loss_rel": float(np.max(np.abs(np.subtract(losses, ref_losses)) / np.abs(ref_losses))),
            "adapters_rel": norm_rel_err(state.params, ref.params),
            "kernel_spec": spec(run.base["block_0"]["attn"]["qkv"]["kernel"]),
            "qkv_a_spec": spec(qkv.a), "qkv_b_spec": spec(qkv.b), "out_a_spec": spec(out.a),
            "trained_leaves": len(jax.tree.leaves(state.params))}), flush=True)


def check_consistency() -> None:
    """Consistency distillation (LCM and sCM) sharded: the teacher placed like the student,
    the same losses as on one device."""
    from jdit.train.loop import train as train_run

    with tempfile.TemporaryDirectory() as tmp:
        teacher = os.path.join(tmp, "teacher")
        c = CONFIG.to_dict()
        c["train"] = {**c["train"], "steps": 2, "sample_every": 0, "log_every": 1}
        c["parallel"] = {"mesh": {"data": -1}, "rules": "dp"}
        train_run(c, teacher, quiet=True)
        for method in ("consistency", "scm"):
            def student(mesh: dict, rules: str, devices=None, method: str = method) -> Run:
                d = CONFIG.to_dict()
                d["distill"] = {"teacher": teacher, "method": method, "grid_steps": 10,
                                "tangent_warmup": 2}
                d["train"] = {**d["train"], "init_from": teacher}
                d["parallel"] = {"mesh": mesh, "rules": rules}
                return Run(d, devices=devices)

            _, ref_losses = train(student({"data": 1}, "dp", jax.devices()[:1]))
            for mesh, rules in [({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp")]:
                run = student(mesh, rules)
                _, losses = train(run)
                kernel = run.teacher[1]["block_0"]["attn"]["qkv"]["kernel"]
                print(json.dumps({
                    "check": "consistency", "method": method, "mesh": mesh,
                    "loss_rel": float(np.max(np.abs(np.subtract(losses, ref_losses))
                                             / np.abs(ref_losses))),
                    "teacher_sharded": not kernel.sharding.is_fully_replicated}), flush=True)


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    {"training": check_training, "sampling": check_sampling, "checkpoints": check_checkpoints,
     "pallas": check_pallas, "lora": check_lora,
     "consistency": check_consistency}[sys.argv[1]]()
