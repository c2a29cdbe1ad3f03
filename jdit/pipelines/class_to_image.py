"""``ClassToImage``: class-conditional DiT generation from a diffusers ``DiTPipeline`` folder.

As diffusers' ``DiTPipeline``: standard normal latents, guidance on the ε channels against the
null class (id ``num_classes``) when ``guidance_scale > 1``, the learned-sigma channels dropped
before the solver, ``latents / scaling_factor`` decoded to [0, 1]. Sampling and decoding are one
compiled program per (batch, solver, steps).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jdit.pipelines import hub
from jdit.pipelines.arguments import check_generation, check_latents
from jdit.pipelines.output import to_output
from jdit.pipelines.schedulers import SamplerSpec, from_diffusers_config
from jdit.sampling import ClassifierFreeGuidance, sample
from jdit.sampling.sample import STOCHASTIC

Array = jax.Array


@dataclasses.dataclass(eq=False)
class ClassToImage:
    """DiT transformer, VAE and sampler of one pipeline; call it with class ids."""

    transformer: nn.Module
    transformer_params: Any
    vae: nn.Module
    vae_params: Any
    scheduler: SamplerSpec
    id2label: dict[int, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._compiled: dict[Any, Any] = {}

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *, dtype: Any = jnp.float32,
                        vae_dtype: Any = jnp.float32, revision: str | None = None
                        ) -> ClassToImage:
        """Load a diffusers ``DiTPipeline`` folder or hub repo id."""
        from jdit import autoencoders, models

        folder = hub.resolve(path_or_repo_id, revision)
        index = hub.model_index(folder)
        if index["_class_name"] != "DiTPipeline":
            raise ValueError(f"{folder}: {index['_class_name']!r} is not a DiTPipeline")
        transformer, t_params = models.from_pretrained(folder / "transformer", dtype=dtype)
        vae, v_params = autoencoders.from_pretrained(folder / "vae", dtype=vae_dtype)
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        labels = {int(k): str(v) for k, v in (index.get("id2label") or {}).items()}
        return cls(transformer, t_params, vae, v_params, from_diffusers_config(sched), labels)

    def label_ids(self, names: Sequence[str]) -> list[int]:
        """Class ids for label names (each of a label's comma-separated synonyms works)."""
        lookup = {syn.strip(): i for i, label in self.id2label.items() for syn in label.split(",")}
        missing = [n for n in names if n not in lookup]
        if missing:
            raise ValueError(f"unknown labels {missing}" + ("" if self.id2label else
                                                             " (this pipeline has no id2label)"))
        return [lookup[n] for n in names]

    def _denoise_fn(self, x: Array, t: Array, params: Any, labels: Array) -> Array:
        return self.transformer.apply({"params": params}, x, t, labels=labels)

    def _program(self, solver: str, num_steps: int, guided: bool) -> Any:
        sig = (solver, num_steps, guided)
        if sig not in self._compiled:
            spec = self.scheduler
            model_fn = ClassifierFreeGuidance(self._denoise_fn) if guided else self._denoise_fn

            def run(params: Any, vae_params: Any, labels: Array, noise: Array, scale: Array,
                    key: Array) -> Array:
                if guided:
                    null = jnp.full_like(labels, self.transformer.num_classes)
                    args: tuple[Any, ...] = (scale, params, jnp.concatenate([null, labels]))
                else:
                    args = (params, labels)
                x = sample(model_fn, noise, solver=solver, num_steps=num_steps,
                           schedule=spec.schedule, prediction=spec.prediction,
                           variance=spec.variance, args=args,
                           solver_options=dict(spec.options) if solver == spec.solver else None,
                           key=key if solver in STOCHASTIC else None)
                images = self.vae.apply({"params": vae_params}, x / float(self.vae.scaling_factor),
                                        method="decode")
                return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

            self._compiled[sig] = jax.jit(run)
        return self._compiled[sig]

    def __call__(self, class_labels: int | Sequence[int], num_steps: int = 50,
                 guidance_scale: float = 4.0, seed: int = 0,
                 latents: Array | np.ndarray | None = None, solver: str | None = None,
                 output_type: str = "np") -> np.ndarray | list[Any]:
        """Images for ``class_labels`` (ints in ``[0, num_classes)``): ``np`` (B, H, W, 3) in
        [0, 1] or ``pil``. ``latents`` (standard normal, NHWC) replace the noise from ``seed``."""
        labels = np.atleast_1d(np.asarray(class_labels))
        n = int(self.transformer.num_classes)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.size == 0 \
                or labels.min() < 0 or labels.max() >= n:
            raise ValueError(f"class_labels must be ints in [0, {n}), got {class_labels!r}")
        check_generation(num_steps=num_steps, guidance_scale=guidance_scale, seed=seed)
        s, c = int(self.transformer.input_size), int(self.transformer.in_channels)
        shape = (len(labels), s, s, c)
        noise = (jax.random.normal(jax.random.key(seed), shape) if latents is None
                 else jnp.asarray(check_latents(latents, shape)))
        run = self._program(solver or self.scheduler.solver, int(num_steps), guidance_scale > 1)
        out = run(self.transformer_params, self.vae_params, jnp.asarray(labels, jnp.int32), noise,
                  jnp.float32(guidance_scale), jax.random.fold_in(jax.random.key(seed), 1))
        return to_output(np.asarray(out), output_type)
