"""``TextToVideo``: Latte generation from a diffusers ``LattePipeline`` folder, in JAX.

    pipe = TextToVideo.from_pretrained("maxin-cn/Latte-1")
    video = pipe("a dog wearing sunglasses on the beach", seed=0)   # (1, 16, 512, 512, 3)

T5 encoding, the whole sampling loop and the frame-by-frame VAE decode run as one compiled
program per (batch, frames, size, solver, steps). It follows diffusers' ``LattePipeline``, so the
same latents, prompt and scheduler give the same video: prompts lower-cased and stripped, T5
tokens padded to 120 with the tokenizer's mask, the negative prompt ("" by default) padded to the
same length, guidance ``uncond + g·(cond - uncond)`` when ``g > 1``, learned-sigma channels dropped
before the solver, ``latents / scaling_factor`` decoded frame by frame and mapped to [0, 1].

The transformer gets no caption mask in diffusers; what it sees depends on the batch
(``mask_feature``, diffusers' default): one video: both captions truncated to the prompt's token
count (its padding never seen; the negative prompt's first tokens, padding included, all seen);
several: every caption kept whole, the prompts' padded positions zeroed (but still attended).
jdit keeps static shapes and reproduces both with masks (``docs/video.md``). ``clean_caption``
(needs bs4 and ftfy) is not reproduced.
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
from jdit.pipelines.arguments import check_generation, check_latents, check_size
from jdit.pipelines.output import to_output
from jdit.pipelines.schedulers import SamplerSpec, from_diffusers_config
from jdit.sampling import ClassifierFreeGuidance, sample
from jdit.sampling.sample import STOCHASTIC

Array = jax.Array
# diffusers pipeline class -> its caption length and call defaults
PIPELINE_CLASSES: dict[str, dict[str, Any]] = {
    "LattePipeline": {"max_sequence_length": 120, "num_steps": 50, "guidance_scale": 7.5},
}


def _texts(prompts: str | Sequence[str], what: str = "prompts") -> list[str]:
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{what} must be a string or a non-empty list of strings, got "
                         f"{prompts!r}")
    return [t.lower().strip() for t in texts]


def caption_inputs(mask: np.ndarray, neg_mask: np.ndarray, mask_feature: bool
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What LattePipeline's transformer sees, as static-shape masks: ``(zero, keep, neg_keep)``
    — the prompts' feature positions to zero, and the prompt's and negative prompt's key masks.

    One video with ``mask_feature``: both captions are cut to the prompt's token count ``n``
    (the tokenizer's mask is a right-padded prefix), i.e. keys ``[0, n)`` kept for both. Several:
    nothing is cut, the prompts' padded features are zeroed and every position is a key.
    Without ``mask_feature``: every position of both is a key, nothing zeroed."""
    ones = np.ones_like(mask)
    if not mask_feature:
        return ones, ones, ones
    if len(mask) == 1:
        n = int(mask.sum())
        prefix = (np.arange(mask.shape[1]) < n).astype(mask.dtype)[None]
        return ones, prefix, prefix
    return mask, ones, np.ones_like(neg_mask)


@dataclasses.dataclass(eq=False)
class TextToVideo:
    """Latte transformer, T5 encoder and tokenizer, image VAE and sampler of one pipeline; call
    it to generate. Build it with :meth:`from_pretrained`, or from parts for research code."""

    transformer: nn.Module
    transformer_params: Any
    text_encoder: nn.Module
    text_encoder_params: Any
    tokenizer: Any
    vae: nn.Module
    vae_params: Any
    scheduler: SamplerSpec
    max_sequence_length: int = 120
    default_steps: int = 50
    default_guidance: float = 7.5

    def __post_init__(self) -> None:
        self._compiled: dict[Any, Any] = {}

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *, dtype: Any = jnp.float32,
                        text_dtype: Any = jnp.float32, vae_dtype: Any = jnp.float32,
                        param_dtype: Any = jnp.float32, revision: str | None = None,
                        **transformer_overrides: Any) -> TextToVideo:
        """Load a diffusers ``LattePipeline`` folder, or a hub repo id (downloaded with
        ``huggingface_hub`` when online). ``dtype`` is the transformer's compute dtype; the text
        encoder and the VAE default to float32; ``param_dtype`` stores the transformer's and
        T5's weights."""
        from jdit import autoencoders, models, text
        from jdit.models.latte import Latte

        folder = hub.resolve(path_or_repo_id, revision)
        name = hub.model_index(folder)["_class_name"]
        if name not in PIPELINE_CLASSES:
            raise ValueError(f"{folder}: pipeline class {name!r} is not a text-to-video pipeline "
                             f"jdit loads; expected one of {sorted(PIPELINE_CLASSES)}")
        missing = [c for c in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
                   if not (folder / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder}: pipeline folder without {missing}")
        transformer, t_params = models.from_pretrained(folder / "transformer", dtype=dtype,
                                                       param_dtype=param_dtype,
                                                       **transformer_overrides)
        if not isinstance(transformer, Latte):
            raise ValueError(f"{folder}/transformer: a {type(transformer).__name__}, not the "
                             f"Latte transformer a {name} runs")
        encoder, e_params = text.from_pretrained(folder / "text_encoder", dtype=text_dtype,
                                                 param_dtype=param_dtype)
        tokenizer = text.T5Tokenizer.from_pretrained(folder / "tokenizer")
        vae, v_params = autoencoders.from_pretrained(folder / "vae", dtype=vae_dtype)
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        spec = PIPELINE_CLASSES[name]
        return cls(transformer, t_params, encoder, e_params, tokenizer, vae, v_params,
                   from_diffusers_config(sched), spec["max_sequence_length"],
                   spec["num_steps"], spec["guidance_scale"])

    @property
    def vae_scale_factor(self) -> int:
        return int(self.vae.scale_factor)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tokens = self.tokenizer(texts, max_length=self.max_sequence_length)
        return (np.asarray(tokens["input_ids"], np.int32),
                np.asarray(tokens["attention_mask"], np.int32))

    def decode(self, vae_params: Any, latents: Array, chunk: int) -> Array:
        """(B, T, h, w, C) latents → (B, T, H, W, 3) frames in [0, 1]: the image VAE on
        ``chunk`` frames at a time (memory only: each frame decodes on its own)."""
        b, f = latents.shape[:2]
        z = latents.reshape(b * f, 1, *latents.shape[2:]) / float(self.vae.scaling_factor)
        shift = float(getattr(self.vae, "shift_factor", None) or 0.0)
        frames = jax.lax.map(
            lambda x: self.vae.apply({"params": vae_params}, x + shift, method="decode"), z,
            batch_size=chunk)
        frames = jnp.clip(frames.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        return frames.reshape(b, f, *frames.shape[2:])

    def _program(self, solver: str, num_steps: int, guided: bool, decode: bool, temporal: bool,
                 chunk: int) -> Any:
        """encode → sample → decode, jitted once per static signature."""
        sig = (solver, num_steps, guided, decode, temporal, chunk)
        if sig in self._compiled:
            return self._compiled[sig]
        spec = self.scheduler

        def denoise(x: Array, t: Array, params: Any, ctx: Array, mask: Array) -> Array:
            return self.transformer.apply({"params": params}, x, t, context=ctx,
                                          context_mask=mask, temporal=temporal)

        model_fn: Any = ClassifierFreeGuidance(denoise) if guided else denoise

        def run(params: dict[str, Any], ids: Array, mask: Array, neg_ids: Array, neg_mask: Array,
                zero: Array, keep: Array, neg_keep: Array, noise: Array, scale: Array,
                key: Array) -> Array:
            encode = self.text_encoder.apply
            ctx = encode({"params": params["text_encoder"]}, ids, mask) * zero[..., None]
            keys = keep
            if guided:
                neg = encode({"params": params["text_encoder"]}, neg_ids, neg_mask)
                ctx, keys = jnp.concatenate([neg, ctx]), jnp.concatenate([neg_keep, keep])
                args: tuple[Any, ...] = (scale, params["transformer"], ctx, keys)
            else:
                args = (params["transformer"], ctx, keys)
            latents = sample(model_fn, noise, solver=solver, num_steps=num_steps,
                             schedule=spec.schedule, prediction=spec.prediction,
                             variance=spec.variance, args=args, solver_options=dict(spec.options)
                             if solver == spec.solver else None,
                             key=key if solver in STOCHASTIC else None)
            return self.decode(params["vae"], latents, chunk) if decode else latents

        self._compiled[sig] = jax.jit(run)
        return self._compiled[sig]

    def __call__(self, prompts: str | Sequence[str], num_steps: int | None = None,
                 guidance_scale: float | None = None, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, seed: int = 0,
                 latents: Array | np.ndarray | None = None,
                 negative_prompt: str | Sequence[str] = "", solver: str | None = None,
                 output_type: str = "np", *, mask_feature: bool = True,
                 enable_temporal_attentions: bool = True, decode_chunk_size: int = 14
                 ) -> np.ndarray | list[Any]:
        """Videos for ``prompts``: ``np`` (B, T, H, W, 3) float32 in [0, 1], ``pil`` a list (per
        video) of lists of PIL frames, or ``latent`` the final latents (B, T, h, w, C).
        ``num_steps`` / ``guidance_scale`` default to diffusers' (50, 7.5); ``num_frames`` to the
        transformer's ``video_length`` (Latte-1: 16), any count from 1 up to it;
        ``height``/``width`` to its training size. ``latents`` (standard normal,
        (B, T, H/8, W/8, C)) replace the noise drawn from ``seed``; ``solver`` None uses the
        folder's scheduler. ``mask_feature`` and ``enable_temporal_attentions`` are
        diffusers'; ``decode_chunk_size`` frames are decoded at a time (memory only)."""
        if output_type not in ("np", "pil", "latent"):
            raise ValueError(f"output_type must be 'np', 'pil' or 'latent', got {output_type!r}")
        num_steps = self.default_steps if num_steps is None else num_steps
        guidance_scale = self.default_guidance if guidance_scale is None else guidance_scale
        check_generation(num_steps=num_steps, guidance_scale=guidance_scale, seed=seed)
        texts = _texts(prompts)
        negs = (_texts(negative_prompt, "negative_prompt") if not isinstance(negative_prompt, str)
                else [negative_prompt.lower().strip()] * len(texts))
        if len(negs) != len(texts):
            raise ValueError(f"{len(negs)} negative prompts for {len(texts)} prompts")
        video_length = int(self.transformer.video_length)
        frames = video_length if num_frames is None else num_frames
        if isinstance(frames, bool) or not isinstance(frames, int) or \
                not 1 <= frames <= video_length:
            raise ValueError(f"num_frames must be an integer from 1 to the transformer's "
                             f"video_length {video_length}, got {num_frames!r}")
        if isinstance(decode_chunk_size, bool) or not isinstance(decode_chunk_size, int) or \
                decode_chunk_size < 1:
            raise ValueError(f"decode_chunk_size must be an integer >= 1, got "
                             f"{decode_chunk_size!r}")
        f = self.vae_scale_factor
        native = int(self.transformer.input_size) * f
        height = native if height is None else height
        width = native if width is None else width
        check_size(height, width, f * int(self.transformer.patch_size))
        shape = (len(texts), frames, height // f, width // f, int(self.transformer.in_channels))
        if latents is None:
            noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        else:
            noise = jnp.asarray(check_latents(latents, shape))
        ids, mask = self.tokenize(texts)
        neg_ids, neg_mask = self.tokenize(negs)
        zero, keep, neg_keep = caption_inputs(mask, neg_mask, bool(mask_feature))
        guided = guidance_scale > 1.0
        run = self._program(solver or self.scheduler.solver, int(num_steps), guided,
                            output_type != "latent", bool(enable_temporal_attentions),
                            decode_chunk_size)
        params = {"transformer": self.transformer_params,
                  "text_encoder": self.text_encoder_params, "vae": self.vae_params}
        out = np.asarray(run(params, ids, mask, neg_ids, neg_mask, zero.astype(np.float32), keep,
                             neg_keep, noise, jnp.float32(guidance_scale),
                             jax.random.fold_in(jax.random.key(seed), 1)))
        if output_type == "latent":
            return out
        b, t = out.shape[:2]
        flat = to_output(out.reshape(b * t, *out.shape[2:]), output_type)
        if output_type == "np":
            return np.asarray(flat).reshape(out.shape)
        return [list(flat[i * t:(i + 1) * t]) for i in range(b)]
