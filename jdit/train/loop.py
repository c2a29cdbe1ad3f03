"""The training loop: read it top to bottom.

    workdir/config.json        the resolved config (``jdit sample`` / ``jdit eval`` rebuild from it)
    workdir/checkpoints/<step> orbax checkpoints (train state + data position), last K kept
    workdir/metrics.jsonl      one line per logged step; TensorBoard events beside it
    workdir/samples/*.png      grids sampled from the EMA parameters during training
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm import tqdm

from jdit import lora
from jdit.config import check_values, complete, required, section
from jdit.files import DirectoryLock, atomic_write, check_replaceable, read_json_object
from jdit.models import build
from jdit.nn.init import abstract_params
from jdit.parallel import Partitioner
from jdit.parallel.distributed import is_primary
from jdit.pipelines.arguments import check_generation
from jdit.train.checkpoint import Checkpointer, DiskFull, is_disk_full
from jdit.train.generate import ControlledParams, make_generator
from jdit.train.optim import learning_rate, make_optimizer, scale_lora_b
from jdit.train.step import TrainState, init_state, make_train_step
from jdit.train.tasks import make_task
from jdit.train.writers import MetricsWriter, save_grid


def lora_config(config: Mapping[str, Any]) -> lora.LoraConfig | None:
    """The ``lora`` section as a :class:`jdit.lora.LoraConfig`, or None when ``rank`` is 0.
    (A LoRA run needs its base, ``train.init_from``: :class:`Run` checks.)"""
    c = section("lora", config.get("lora"))
    if int(c["rank"]) == 0:
        return None
    return lora.LoraConfig(rank=int(c["rank"]), alpha=c["alpha"], targets=tuple(c["targets"]),
                           dropout=float(c["dropout"]))


def is_run_directory(path: str | Path) -> bool:
    """A folder ``jdit train`` wrote: its ``config.json`` holds a run's model and train sections."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("model"), dict) \
        and isinstance(config.get("train"), dict)


def _config_text(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"


def _check_same_config(workdir: Path, config: dict[str, Any]) -> None:
    path = workdir / "config.json"
    text = _config_text(config)
    if path.exists():
        # completed: a run written before a default was added resumes; through JSON, as written
        old = json.loads(json.dumps(complete(read_json_object(path)), default=str))
        steps_only = {**old, "train": {**old["train"], "steps": config["train"]["steps"]}}
        if json.loads(text) != steps_only:
            raise ValueError(f"{path} holds a different config; use a new workdir (only "
                             "train.steps may change when resuming)")


class RunStopped(Exception):
    """A run stopped by SIGTERM or Ctrl-C after saving its state: it resumes from ``step`` when
    started again. ``exit_code`` is the shell's convention for the signal (128 + its number)."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"stopped at step {step} by {signal.Signals(signum).name} (resumable: "
                         "the same command continues the run)")
        self.step, self.signum, self.exit_code = step, signum, 128 + signum


class TrainingDiverged(FloatingPointError):
    """A step's loss, gradient norm or new parameters were not finite (``train.nonfinite`` =
    "stop"): the run stopped without applying it; its checkpoints hold only finite states."""

    def __init__(self, step: int, metrics: Mapping[str, Any], checkpoint: int | None) -> None:
        values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
        if not math.isfinite(values["loss"]):
            cause = f"the loss is {values['loss']}"
        elif not math.isfinite(values["grad_norm"]):
            cause = f"the gradient norm is {values['grad_norm']} (loss {values['loss']:.4g})"
        else:
            cause = f"the updated parameters are not finite (gradient norm {values['grad_norm']:.4g})"
        kept = (f"the last checkpoint (step {checkpoint}) is intact" if checkpoint is not None
                else "no checkpoint was written")
        super().__init__(f"training diverged at step {step}: {cause}; the update was not applied "
                         f"and {kept}. Lower optim.lr, raise optim.warmup_steps or set "
                         "optim.grad_clip; or train.nonfinite='skip' to skip such steps")
        self.step, self.metrics, self.checkpoint = step, values, checkpoint


class _Stop:
    """Turns SIGTERM (and SIGINT) into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def prefetch(make: Callable[[int], Any], start: int, stop: int, depth: int = 2) -> Iterator[Any]:
    """``make(i)`` for i in [start, stop), computed ``depth`` ahead in a thread (batches are pure
    functions of their index, so the order and values are those of the plain loop)."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    closed = threading.Event()

    def work() -> None:
        for i in range(start, stop):
            try:
                item: Any = (make(i), None)
            except BaseException as e:  # handed to the consumer, raised there
                item = (None, e)
            while not closed.is_set():
                try:
                    slots.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if closed.is_set() or item[1] is not None:
                return

    thread = threading.Thread(target=work, name="jdit-prefetch", daemon=True)
    thread.start()
    try:
        for _ in range(start, stop):
            value, error = slots.get()
            if error is not None:
                raise error
            yield value
    finally:
        closed.set()
        thread.join()


class TrainSetup:
    """The data-free part of a run: model, optimizer, mesh and the train state's shardings.

    ``jdit aot`` compiles a train step from it for devices it does not have; :class:`Run` adds
    the data, the sampler and the teacher. ``config`` is completed with the defaults of
    :mod:`jdit.config`; its ``train.steps`` (the learning-rate schedule's length) must be set.
    """

    def __init__(self, config: Mapping[str, Any], devices: Any = None) -> None:
        """``devices``: the devices of the mesh (default: all of them, every process's)."""
        self.config = complete(config)
        c = self.config
        required(c, ["train.steps", "optim.lr"])
        check_values(c)
        self.module = build(c["model"])
        steps = int(c["train"]["steps"])
        self.lr = learning_rate(c["optim"], steps)
        self.tx = make_optimizer(c["optim"], steps)
        self.partitioner = Partitioner.from_config(c["parallel"], devices)
        self.lora = lora_config(c)
        ratio = float(c["lora"]["lr_ratio"])
        if self.lora is not None and ratio != 1.0:  # LoRA+: B learns faster than A
            self.tx = optax.chain(self.tx, scale_lora_b(ratio))
        # a control run (jdit.control): the LoRA is a condition LoRA, used by the condition
        # branch only; its adapters never merge into the base. Or a ControlNet's parameters.
        self.control = c["control"]["method"] != "none"
        self.controlnet = None
        if c["control"]["method"] == "controlnet":
            from jdit.control.controlnet import for_base

            self.controlnet = for_base(self.module, int(c["control"]["controlnet_depth"]))

    @property
    def frozen_base(self) -> bool:
        """The state trains something beside a frozen base (LoRA adapters, a ControlNet)."""
        return self.lora is not None or self.controlnet is not None

    def init_state(self) -> TrainState:
        seed = int(self.config["train"]["seed"])
        if self.controlnet is not None:  # its copies take the base's blocks at the start
            return init_state(self.controlnet, self.tx, seed)
        if self.lora is None:
            return init_state(self.module, self.tx, seed)
        init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
        adapters = lora.init(abstract_params(self.module), self.lora, init_rng, module=self.module)
        return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=adapters,
                          opt_state=self.tx.init(adapters),
                          ema_params=jax.tree.map(jax.numpy.copy, adapters), rng=rng)

    def state_shardings(self) -> TrainState:
        """Parameters and EMA by their logical names; optimizer moments like their parameter.
        With LoRA the parameters are the adapters, named after the kernels they adapt."""
        part = self.partitioner
        if self.controlnet is not None:
            params = part.param_shardings(self.controlnet)
            opt = part.optimizer_shardings(self.controlnet, self.tx)
        elif self.lora is None:
            params = part.param_shardings(self.module)
            opt = part.optimizer_shardings(self.module, self.tx)
        else:
            abstract = jax.eval_shape(self.init_state).params
            params = lora.shardings(abstract, self.module, part)
            opt = part.optimizer_shardings_for(abstract, params, self.tx)
        return TrainState(step=part.replicated, params=params, opt_state=opt,
                          ema_params=params, rng=part.replicated)

    def base_shardings(self) -> Any:
        """The frozen base of a LoRA run: sharded as the model's parameters are."""
        return self.partitioner.param_shardings(self.module)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and target shardings of the train state (restoring, AOT compiles)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            jax.eval_shape(self.init_state), self.state_shardings())

    def sharded_init(self) -> TrainState:
        """The initial state, created directly in its shardings."""
        return self.partitioner.init(self.init_state, self.state_shardings())

    def jit_train_step(self, null: tuple[Any, Any] | None, teacher: Any = None,
                       batch_shardings: Any = None) -> Callable[..., Any]:
        """``train_step`` jitted with explicit state shardings, the state donated (batch
        shardings taken from the batch unless given). Call it inside
        ``self.partitioner.activate()``."""
        shardings = self.state_shardings()
        step = make_train_step(self.module, self.tx, self.lr, self.config, null, teacher,
                               controlnet=self.controlnet)
        frozen = (self.base_shardings(),) if self.frozen_base else ()  # (state, batch, base)
        return jax.jit(step, in_shardings=(shardings, batch_shardings, *frozen),
                       out_shardings=(shardings, self.partitioner.replicated), donate_argnums=0)


class Run(TrainSetup):
    """The objects a run is made of, built from a config (also used by sample/eval)."""

    def __init__(self, config: Mapping[str, Any], devices: Any = None) -> None:
        super().__init__(config, devices)
        c = self.config
        required(c)
        if self.frozen_base and not c["train"]["init_from"]:
            what = "a ControlNet" if self.controlnet is not None else "adapters"
            raise ValueError(f"this run trains {what} over a frozen base model: set "
                             "train.init_from (a jdit run directory or a checkpoint "
                             "jdit.models.from_pretrained reads)")
        self.batch_size = int(c["train"]["batch_size"])
        self.task = make_task(c["data"], self.batch_size, int(c["train"]["seed"]))
        if self.control and getattr(self.task, "condition", None) is None:
            raise ValueError(f"control.method={c['control']['method']!r} needs data that give "
                             "each image its condition (shapes: data.condition)")
        if hasattr(self.task, "check_model"):  # a feature cache made for another model
            self.task.check_model(self.module)
        self.generate = make_generator(self.module, self.task, c, self.partitioner,
                                       controlnet=self.controlnet)
        self._teacher: tuple[Any, Any] | None = None
        self._base: Any = None

    @property
    def base(self) -> Any:
        """A LoRA or ControlNet run's frozen base (``train.init_from``), in its shardings;
        None otherwise."""
        if self.frozen_base and self._base is None:
            params = pretrained_params(self, str(self.config["train"]["init_from"]))
            self._base = jax.device_put(params, self.base_shardings())
        return self._base

    @property
    def step_args(self) -> tuple[Any, ...]:
        """What ``train_step`` takes after the state and the batch: the base of a LoRA run."""
        return (self.base,) if self.frozen_base else ()

    def full_params(self, params: Any) -> Any:
        """The model's parameters for ``params`` of the train state (a LoRA run's adapters
        merged into its frozen base: the tree, and shardings, of the model's parameters)."""
        if self.control:
            return ControlledParams(self.base, params, float(self.config["control"]["scale"]))
        return params if self.lora is None else jax.jit(lora.merge)(self.base, params)

    @property
    def teacher(self) -> tuple[Any, Any] | None:
        """``(module, EMA params)`` of the frozen teacher named by ``distill.teacher`` (a jdit
        workdir), placed in this run's parameter shardings; None without distillation."""
        if self._teacher is None and self.config["distill"]["teacher"]:
            trained, params, _ = load_trained(self.config["distill"]["teacher"])
            module = trained.module
            self._teacher = (module, jax.device_put(
                params, self.partitioner.param_shardings(module)))
        return self._teacher

    def batch(self, index: int) -> dict[str, jax.Array]:
        """Global batch ``index`` as sharded arrays; this process computes only its own rows."""
        part = self.partitioner
        rows = part.local_rows(self.batch_size)
        local = self.task.batch(index, rows=rows)
        return part.shard_batch(local, self.batch_size)

    def jit_train_step(self, null: tuple[Any, Any] | None, teacher: Any = None,
                       batch_shardings: Any = None) -> Callable[..., Any]:
        return super().jit_train_step(null, self.teacher if teacher is None else teacher,
                                      batch_shardings)


def process_seconds() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere): what a user waits
    before the first step, imports included."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def use_compile_cache(folder: Path) -> bool:
    """Keep XLA's compiled programs in ``folder`` (JAX's persistent compilation cache), so a
    resumed run or a re-run of the same config does not compile again. Left alone when the
    user set a cache directory already; returns whether ``folder`` is now the cache."""
    from jax.experimental.compilation_cache import compilation_cache

    if jax.config.jax_compilation_cache_dir:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # JAX decides once per process whether a cache is used, at the first compile (eager
    # operations included); start that decision again now that there is one
    compilation_cache.reset_cache()
    return True


def train(config: Mapping[str, Any], workdir: str | Path, *, stop_after: int | None = None,
          quiet: bool = False, compile_cache: bool = False) -> dict[str, Any]:
    """Train (or resume) in ``workdir``; returns the last logged metrics.

    ``compile_cache``: keep compiled programs in ``workdir/compile_cache`` (what ``jdit
    train`` does; :func:`use_compile_cache`). The first logged metrics row of every call has
    ``startup_s`` (from this call to the end of the first step: setup, restore and compile),
    ``first_step_s`` (the first step alone, mostly its compile) and ``process_s`` (the
    process's age then, Linux only: for ``jdit train``, imports included).

    ``stop_after`` ends the run after that many steps in this call, saving a checkpoint, as a
    SIGTERM would (used by the resume tests), and returns. A SIGTERM or Ctrl-C saves, then raises
    :class:`RunStopped`. Bad values, a workdir of someone else's files, a different config or a
    ``train.steps`` below the step the run has reached are refused before anything is compiled
    or written.
    """
    called = time.perf_counter()
    workdir = Path(workdir)
    primary = is_primary()  # with several hosts, one writes the run's files
    # a run writes, rotates and deletes checkpoints here: never in a folder of the user's files
    check_replaceable(workdir, ours=is_run_directory, what="a jdit run directory")
    run = Run(config)
    # one process per run directory (the primary host's; others write no run files)
    lock = DirectoryLock(workdir, "run directory") if primary else contextlib.nullcontext()
    with lock:
        workdir.mkdir(parents=True, exist_ok=True)
        steps = int(run.config["train"]["steps"])
        _check_same_config(workdir, run.config)
        reached = _reached_step(workdir)
        if reached is not None and reached > steps:
            raise ValueError(f"train.steps={steps} is below step {reached}, which the run in "
                             f"{workdir} has reached; ask for at least that many steps, or use a "
                             "new workdir")
        # every host has read the run directory before the primary writes into it
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jdit.train: run directory checked")
        if primary:
            atomic_write(workdir / "config.json", _config_text(run.config))
        if compile_cache:
            use_compile_cache(workdir / "compile_cache")
        try:
            return _train_loop(run, workdir, primary, stop_after, quiet, called)
        except Exception as e:  # a full disk under a log or sample write: said once, plainly
            if isinstance(e, DiskFull) or not is_disk_full(e):
                raise
            intact = _reached_step(workdir)
            kept = "no checkpoint was completed" if intact is None else \
                f"step {intact} is the latest intact checkpoint"
            where = getattr(e, "filename", None) or workdir
            raise DiskFull(errno.ENOSPC, f"disk full while writing {where}; {kept}. Free some "
                           "space and run the same command to resume") from None


def _train_loop(run: Run, workdir: Path, primary: bool, stop_after: int | None,
                quiet: bool, called: float) -> dict[str, Any]:
    c, task = run.config, run.task
    tc = c["train"]
    steps, log_every, sample_every = int(tc["steps"]), int(tc["log_every"]), int(tc["sample_every"])

    ckpt = Checkpointer(workdir / "checkpoints", every=int(tc["checkpoint_every"]),
                        keep=int(tc["keep_checkpoints"]), async_save=bool(tc["async_checkpoints"]))
    part = run.partitioner
    part.check_batch_size(run.batch_size)
    start = 0
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(run.abstract_state())
        start = int(meta["data_index"])
    else:
        state = run.sharded_init()
        if run.controlnet is not None:  # the copies start as the base's first blocks
            from jdit.control.controlnet import from_base

            state = jax.device_put(state.replace(
                params=from_base(state.params, run.base),
                ema_params=from_base(state.ema_params, run.base)), run.state_shardings())
        elif tc["init_from"] and run.lora is None:  # (a LoRA run's base stays apart: run.base)
            state = jax.device_put(init_from(state, run, str(tc["init_from"])),
                                   run.state_shardings())
        elif c["distill"]["inherit"] and run.teacher is not None:
            state = jax.device_put(inherit_teacher(state, run, workdir if primary else None),
                                   run.state_shardings())
    if int(tc["prior_images"]) > 0:  # DreamBooth's prior preservation (jdit.train.prior)
        task = run.task = _with_prior(run, workdir if primary else None)
    null = task.null() if task.kind == "text" else None
    train_step = run.jit_train_step(None if null is None else (null["context"],
                                                               null["context_mask"]))
    writer = MetricsWriter(workdir, resume_step=start) if primary else None
    preview = task.preview()  # None: this task's samples are not images (latents)
    if preview is None:
        sample_every = 0
    else:
        preview_prompts, preview_cond = preview
        if primary:
            (workdir / "samples").mkdir(exist_ok=True)
            (workdir / "samples" / "prompts.txt").write_text("\n".join(preview_prompts) + "\n")

    stop = _Stop()
    bar = tqdm(total=steps, initial=start, disable=quiet or not primary, unit="step",
               file=sys.stderr, dynamic_ncols=True)
    last: dict[str, Any] = {}
    batches = prefetch(run.batch, start, steps)
    t0, n0, done = time.perf_counter(), start, start
    timing: dict[str, float] = {}  # start-up figures, logged once
    timing_logged = False
    stop_on_nonfinite = tc["nonfinite"] == "stop"
    skipped = 0  # non-finite steps in this call: a device scalar, read when logging
    previous, diverged = None, None
    try:
        for step, batch in zip(range(start, steps), batches, strict=True):
            with part.activate():
                state, metrics = train_step(state, batch, *run.step_args)
            done = step + 1
            if done == start + 1:  # the first step of this call: start-up and compile
                jax.block_until_ready(metrics["loss"])
                now = time.perf_counter()
                timing = {"startup_s": now - called, "first_step_s": now - t0}
                since = process_seconds()
                if since is not None:
                    timing["process_s"] = since
                t0 = time.perf_counter()  # the step rate counts compiled steps only
                n0 = done
            bar.update(1)
            skipped = skipped + ~metrics["finite"]
            # the previous step's flag: read while this step runs, so the device never waits
            if stop_on_nonfinite and previous is not None and not bool(previous[1]["finite"]):
                diverged = previous
                break
            previous = (done, metrics)
            if done % log_every == 0 or done == steps:
                last = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
                last["skipped_steps"] = float(skipped)
                if done > n0:
                    last["steps_per_second"] = (done - n0) / (time.perf_counter() - t0)
                if not timing_logged:
                    last.update(timing)
                    timing_logged = True
                if writer is not None:
                    writer.write(done, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
            if sample_every and (done % sample_every == 0 or done == steps):
                images = run.generate(run.full_params(state.ema_params), preview_cond,
                                      seed=0)  # every host
                if primary:
                    save_grid(workdir / "samples" / f"step_{done:07d}.png", images,
                              columns=8, scale=2)
            interrupted = stop.requested or (stop_after is not None and done - start >= stop_after)
            if ckpt.should_save(done) or done == steps or interrupted:
                ckpt.save(done, state, {"data_index": done, "step": done})
            if interrupted:
                break
        if stop_on_nonfinite and diverged is None and previous is not None \
                and not bool(previous[1]["finite"]):
            diverged = previous
    finally:
        batches.close()
        bar.close()
        stop.restore()
        ckpt.close()
        if writer is not None:
            writer.close()
    if diverged is not None:
        raise TrainingDiverged(*diverged, ckpt.latest_step())
    if stop.signum is not None:
        raise RunStopped(done, stop.signum)
    return {**timing, **last}


def _with_prior(run: Run, workdir: Path | None) -> Any:
    """``run.task`` with prior examples of the base in every batch (:mod:`jdit.train.prior`)."""
    from jdit.train import prior

    tc = run.config["train"]
    if not tc["init_from"]:
        raise ValueError("train.prior_images > 0 samples the base model: set train.init_from")
    base = run.base if run.lora is not None else jax.device_put(
        pretrained_params(run, str(tc["init_from"])), run.base_shardings())
    examples = prior.load_or_generate(run, base, workdir)
    rows = int(tc["prior_batch"]) or max(1, run.batch_size // 4)
    return prior.PriorTask(run.task, examples, rows, float(tc["prior_weight"]), run.batch_size,
                           int(tc["seed"]))


def _reached_step(workdir: Path) -> int | None:
    if not (workdir / "checkpoints").is_dir():
        return None
    # each host reads on its own: a shared barrier here would pair with the primary's
    # Checkpointer barriers if the primary has already created the folder
    return Checkpointer(workdir / "checkpoints", every=0, read_only=True,
                        this_process_only=True).latest_step()


def init_from(state: TrainState, run: Run, path: str) -> TrainState:
    """Start from another run's weights (the previous stage of a recipe): ``path`` is a jdit
    workdir (its EMA parameters) or anything :func:`jdit.models.from_pretrained` reads. The
    optimizer state, step and RNG start fresh. Every parameter must match in name and shape."""
    params = pretrained_params(run, path)
    return state.replace(params=params, ema_params=jax.tree.map(jax.numpy.copy, params),
                         opt_state=run.tx.init(params))


def pretrained_params(run: TrainSetup, path: str) -> Any:
    """The model parameters at ``path`` (a jdit workdir's EMA parameters, or anything
    :func:`jdit.models.from_pretrained` reads) for ``run``'s model, in its dtypes; every
    parameter must match in name and shape."""
    from jdit.models import from_pretrained
    from jdit.weights.state_dict import check_tree

    if (Path(path) / "config.json").exists() and (Path(path) / "checkpoints").is_dir():
        _, params, _ = load_trained(path)
    else:
        m = run.module
        _, params = from_pretrained(path, scan_layers=m.scan_layers, input_size=m.input_size,
                                    **({"pe_interpolation": m.pe_interpolation}
                                       if hasattr(m, "pe_interpolation") else {}))
    like = abstract_params(run.module)
    check_tree(params, like, path)
    return jax.tree.map(lambda p, a: jax.numpy.asarray(p, a.dtype), params, like)


def inherit_teacher(state: TrainState, run: Run, workdir: Path | None) -> TrainState:
    """LiT's start: the teacher's weights except its self-attention (``jdit.models.lit``); the
    report of what was and was not inherited goes to ``workdir/inherited.json``."""
    from jdit.models import lit

    assert run.teacher is not None
    d = run.config["distill"]
    params, report = lit.inherit(jax.device_get(run.teacher[1]), run.module,
                                 jax.random.PRNGKey(int(run.config["train"]["seed"])),
                                 load_attention=bool(d["load_attention"]))
    if workdir is not None:
        (workdir / "inherited.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"inherited {len(report['inherited'])} weights from {d['teacher']}; initialised "
              f"{len(report['initialised'])} (attention-specific or mismatched), "
              f"{len(report['unused'])} teacher weights unused: see inherited.json",
              file=sys.stderr)
    params = jax.tree.map(lambda p, like: jax.numpy.asarray(p, like.dtype), params, state.params)
    return state.replace(params=params, ema_params=jax.tree.map(jax.numpy.copy, params),
                         opt_state=run.tx.init(params))


def _restore(workdir: Path) -> tuple[Run, TrainState, int]:
    """The run of a directory's config and the train state of its latest checkpoint."""
    cfg_path = workdir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{workdir} has no config.json: is it a jdit train workdir?")
    config = read_json_object(cfg_path)
    try:
        run = Run(config)
    except ValueError as e:  # trained on another topology: spread over the devices here
        if "devices" not in str(e):
            raise ValueError(f"{cfg_path}: {e}") from None
        config["parallel"] = {**config.get("parallel", {}), "mesh": {"fsdp": -1}}
        run = Run(config)
    ckpt = Checkpointer(workdir / "checkpoints", every=0, read_only=True)
    try:
        state, meta = ckpt.restore(run.abstract_state())
    finally:
        ckpt.close()
    return run, state, int(meta["step"])


def load_trained(workdir: str | Path, use_ema: bool = True) -> tuple[Run, Any, int]:
    """``(run, params, step)`` from a run directory's config and latest checkpoint (a LoRA
    run's adapters merged into its base: the fine-tuned model, sampled at full speed)."""
    run, state, step = _restore(Path(workdir))
    params = state.ema_params if use_ema else state.params
    if run.frozen_base:
        params = run.full_params(params)
    return run, params, step


def load_adapters(workdir: str | Path, use_ema: bool = True) -> tuple[Run, Any, int]:
    """``(run, adapters, step)`` of a LoRA run directory (its EMA adapters by default)."""
    run, state, step = _restore(Path(workdir))
    if run.lora is None:
        raise ValueError(f"{workdir}: not a LoRA run (its config has lora.rank = 0)")
    return run, state.ema_params if use_ema else state.params, step


def evaluate(workdir: str | Path, **kwargs: Any) -> dict[str, Any]:
    run, params, step = load_trained(workdir)
    if run.controlnet is not None:  # it reads its condition at the latents' size only
        kwargs = {"position_aware": False, **kwargs}
    result = run.task.evaluate(
        lambda cond, s, **kw: run.generate(params, cond, seed=1000 + s, **kw), **kwargs)
    return {"step": step, **result}


def _condition_from_file(path: str | Path, task: Any, n: int) -> np.ndarray:
    """An image file as a pixel-space task's condition: (n, size, size, 3) in [-1, 1]."""
    from PIL import Image

    if not hasattr(task, "size") or getattr(task, "channels", 3) != 3:
        raise ValueError("control images are read for pixel-space tasks (the shapes data)")
    image = Image.open(path).convert("RGB").resize((task.size, task.size), Image.BILINEAR)
    a = np.asarray(image, np.float32) / 127.5 - 1.0
    return np.repeat(a[None], n, axis=0)


def evaluate_composition(workdirs: list[str | Path], guess_mode: bool | None = None,
                         attend_each_other: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Two control runs over the same base, trained apart, used together (zero-shot
    composition, :func:`jdit.train.tasks.shapes_composition`); ``guess_mode`` None keeps the
    first run's setting; ``attend_each_other``: the conditions' tokens see each other (not
    EasyControl's pattern, for comparison)."""
    from jdit.train.tasks import shapes_composition

    if len(workdirs) != 2:
        raise ValueError(f"composition takes two control runs, got {len(workdirs)}")
    loaded = [load_trained(w) for w in workdirs]
    runs = [r for r, _, _ in loaded]
    if not all(r.control and r.controlnet is None for r in runs):
        raise ValueError("composition takes control runs of condition LoRAs "
                         "(control.method='easycontrol')")
    bases = {str(r.config["train"]["init_from"]) for r in runs}
    if len(bases) != 1:
        raise ValueError(f"the runs have different bases: {sorted(bases)}")
    first = runs[0]
    config = first.config
    if guess_mode is not None:
        config = {**config, "control": {**config["control"], "guess_mode": bool(guess_mode)}}
    config = {**config, "control": {**config["control"],
                                    "attend_each_other": bool(attend_each_other)}}
    generate = make_generator(first.module, first.task, config)  # (condition LoRAs only)
    params = ControlledParams(loaded[0][1].base, [p.adapters for _, p, _ in loaded],
                              [p.scale for _, p, _ in loaded])
    styles = (runs[0].task.condition, runs[1].task.condition)
    sizes = (runs[0].task.condition_size, runs[1].task.condition_size)
    out = shapes_composition(lambda c, s: generate(params, c, seed=1000 + s), first.task.encode,
                             styles, first.task.size, condition_sizes=sizes, **kwargs)
    return {"runs": [str(w) for w in workdirs], "styles": list(styles),
            "attend_each_other": bool(attend_each_other), **out}


def sample_prompts(workdir: str | Path, conditions: list[str], out: str | Path,
                   num_per_prompt: int = 4, seed: int = 0,
                   loras: list[tuple[str, float]] | tuple[()] = (),
                   control_image: str | Path | None = None, **kwargs: Any) -> np.ndarray:
    """Generate ``num_per_prompt`` images per prompt (or class id) and save them as one grid;
    ``loras``: (path, scale) of LoRAs merged into the run's model first; ``control_image``: a
    control run's condition (an image file, resized to the run's size) for every image."""
    check_generation(num_steps=kwargs.get("num_steps", 1), seed=seed,
                     guidance_scale=kwargs.get("guidance_scale", 1.0),
                     num_images_per_prompt=num_per_prompt)
    if not conditions:
        raise ValueError("no prompts (or class ids) to sample")
    run, params, _ = load_trained(workdir)
    if control_image is not None and not run.control:
        raise ValueError(f"{workdir}: not a control run; it takes no control image")
    if loras and run.control:
        raise ValueError("LoRAs merge into a plain model; a control run keeps its base apart")
    if loras:
        trees = [load_adapters(path)[1] if is_run_directory(path) else
                 lora.load(path, run.module)[0] for path, _ in loras]
        params = jax.jit(lora.merge)(params, trees, [float(s) for _, s in loras])
    repeated = [p for p in conditions for _ in range(num_per_prompt)]
    if run.task.kind == "text":
        cond = run.task.encode(repeated)
        if control_image is not None:
            cond["condition"] = _condition_from_file(control_image, run.task, len(repeated))
    else:
        cond = {"labels": np.asarray([int(p) for p in repeated], np.int32)}
    images = run.generate(params, cond, seed=seed, **kwargs)
    save_grid(out, images, columns=num_per_prompt, scale=4)
    return images
