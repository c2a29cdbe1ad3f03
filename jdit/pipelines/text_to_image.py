"""``TextToImage``: PixArt-α / PixArt-Σ / SANA generation from a diffusers pipeline folder, in JAX.

    pipe = TextToImage.from_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
    images = pipe(["a small cactus with a happy face in the Sahara desert"], seed=0)

Text encoding, the whole sampling loop and the VAE decode run as one compiled program per
(batch, size, solver, steps). It follows the diffusers pipelines step by step, so the same
latents, prompt and scheduler give the same image: prompts lower-cased and stripped, T5 tokens
padded to ``max_sequence_length`` with the tokenizer's mask, the negative prompt padded to the
same length, guidance ``uncond + g·(cond - uncond)`` when ``g > 1``, learned-sigma channels
dropped before the solver, ``latents / scaling_factor`` decoded and mapped to [0, 1], and
resolution binning to PixArt's aspect-ratio table with a resize-and-crop back. (diffusers'
``clean_caption`` needs bs4 and ftfy and rewrites captions with many regular expressions; it is
not reproduced: clean captions yourself if you rely on it.)

SANA differs in its text side, as diffusers' ``SanaPipeline`` does it: a Gemma-2 encoder, the
prompt prefixed with SANA's "complex human instruction" and tokenized to that instruction's
length plus ``max_sequence_length - 2``, of whose features the first and the last
``max_sequence_length - 1`` are kept; the negative prompt without the instruction. Its
autoencoder is a DC-AE (32× down, 32 channels).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdit.data.buckets import TABLES, closest_bucket
from jdit.pipelines import hub
from jdit.pipelines.arguments import check_generation, check_latents, check_size
from jdit.pipelines.output import resize_and_crop, to_output
from jdit.pipelines.schedulers import SamplerSpec, from_diffusers_config
from jdit.sampling import ClassifierFreeGuidance, PerturbedAttentionGuidance, sample
from jdit.sampling.sample import STOCHASTIC

Array = jax.Array
# SANA's prompt prefix (diffusers' SanaPipeline default; the published models were tuned with it)
SANA_INSTRUCTION = "\n".join([
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual "
    "descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, "
    "and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly "
    "without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round "
    "shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red "
    "flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, "
    "featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a "
    "double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any "
    "additional commentary or evaluations:",
    "User Prompt: ",
])
# diffusers pipeline class -> default max_sequence_length, the binning tables by sample_size,
# the text encoder family and the prompt prefix
PIPELINE_CLASSES: dict[str, dict[str, Any]] = {
    "PixArtAlphaPipeline": {"max_sequence_length": 120, "bins": {32: 256, 64: 512, 128: 1024},
                            "text": "t5", "instruction": None},
    "PixArtSigmaPipeline": {"max_sequence_length": 300,
                            "bins": {32: 256, 64: 512, 128: 1024, 256: 2048},
                            "text": "t5", "instruction": None},
    "SanaPipeline": {"max_sequence_length": 300, "bins": {16: 512, 32: 1024, 64: 2048},
                     "text": "gemma2", "instruction": SANA_INSTRUCTION},
}
# Lumina-Image 2.0 (diffusers' Lumina2Pipeline defaults): Gemma-2's second-to-last hidden state
# of the system prompt + prompt (the negative prompt bare), no resolution binning, guidance
# rescaled to the conditional prediction's norm, the scheduler given σ = linspace(1, 1/N, N)
LUMINA2_SYSTEM_PROMPT = ("You are an assistant designed to generate superior images with the "
                         "superior degree of image-text alignment based on textual prompts or "
                         "user prompts.")
PIPELINE_CLASSES["Lumina2Pipeline"] = {
    "max_sequence_length": 256, "bins": None, "text": "gemma2", "instruction": None,
    "template": LUMINA2_SYSTEM_PROMPT + " <Prompt Start> {prompt}", "hidden_layer": -2,
    "cfg_normalization": True, "cfg_trunc_ratio": 1.0, "sigmas": "linspace"}
# ControlNet pipelines: the base pipeline's settings plus a controlnet/ folder (SANA's in
# diffusers; PixArt-δ's in diffusers' research project, examples/research_projects/pixart)
CONTROLNET_PIPELINES = {"SanaControlNetPipeline": "SanaPipeline",
                        "PixArtAlphaControlnetPipeline": "PixArtAlphaPipeline"}
PIPELINE_CLASSES.update({k: PIPELINE_CLASSES[v] for k, v in CONTROLNET_PIPELINES.items()})
# PixArt-Σ with perturbed-attention guidance (diffusers' PixArtSigmaPAGPipeline): its defaults
PIPELINE_CLASSES["PixArtSigmaPAGPipeline"] = {**PIPELINE_CLASSES["PixArtSigmaPipeline"],
                                              "pag_scale": 3.0, "pag_layers": (1,)}
PIPELINE_CLASSES["SanaPAGPipeline"] = {**PIPELINE_CLASSES["SanaPipeline"], "pag_scale": 3.0,
                                       "pag_layers": (0,)}
# SANA-Sprint: SANA's prompts, the guidance scale embedded by the transformer (no classifier-free
# guidance, no negative prompt), two TrigFlow consistency steps by default, 1024 px bins only
PIPELINE_CLASSES["SanaSprintPipeline"] = {**PIPELINE_CLASSES["SanaPipeline"], "bins": {32: 1024},
                                          "num_steps": 2}


def _check_scale(scale: Any) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int | float | np.number) or \
            not np.isfinite(scale):
        raise ValueError(f"a LoRA scale must be a finite number, got {scale!r}")


def _texts(prompts: str | Sequence[str], lower: bool = True) -> list[str]:
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    return [t.lower().strip() for t in texts] if lower else texts


def guidance_interval(spec: SamplerSpec, solver: str, num_steps: int, ratio: float
                      ) -> tuple[float, float] | None:
    """Lumina-Image 2.0's ``cfg_trunc_ratio`` as a timestep interval of
    :class:`jdit.sampling.ClassifierFreeGuidance`: guided while ``(i + 1) / num_steps <= ratio``
    (step index ``i``), i.e. at the timesteps down to that of the last guided step; None: every
    step. Exact for solvers that call the model once per step at the grid's timesteps."""
    if ratio >= 1.0:
        return None
    from jdit.sampling.solvers import _grid

    if solver != "euler":
        raise ValueError(f"cfg_trunc_ratio < 1 is defined for the euler solver (Lumina-Image "
                         f"2.0's scheduler), got {solver!r}")
    guided = sum((i + 1) / num_steps <= ratio for i in range(num_steps))  # steps 0..guided-1
    if guided == 0:
        return (np.inf, np.inf)
    ts = np.asarray(_grid(spec.schedule, num_steps)[0], np.float32)
    return (float(ts[guided - 1]), np.inf)


@dataclasses.dataclass(eq=False)
class TextToImage:
    """Transformer, T5 encoder and tokenizer, VAE and sampler of one pipeline; call it to
    generate. Build it with :meth:`from_pretrained`, or from parts for research code."""

    transformer: nn.Module
    transformer_params: Any
    text_encoder: nn.Module
    text_encoder_params: Any
    tokenizer: Any
    vae: nn.Module
    vae_params: Any
    scheduler: SamplerSpec
    max_sequence_length: int = 300
    bins: dict[int, int] | None = dataclasses.field(default_factory=dict)  # None: no binning
    mesh: Mesh | None = None
    instruction: str | None = None  # SANA's prompt prefix (see the module docstring)
    controlnet: nn.Module | None = None  # a ControlNet-Transformer (jdit.control.controlnet)
    controlnet_params: Any = None
    # LLM prompt encoders (jdit.pipelines.prompts.PromptEncoder), one or several (packed for the
    # transformer's text_refiner): when given they replace text_encoder/tokenizer, and prompts
    # are used as written (not lower-cased)
    text_encoders: list[Any] | None = None
    # guidance as Lumina-Image 2.0's pipeline does it (defaults of __call__): rescale the guided
    # prediction to the conditional one's norm; guide only the first cfg_trunc_ratio of steps
    cfg_normalization: bool = False
    cfg_trunc_ratio: float = 1.0
    default_steps: int = 20  # num_steps when a call does not say (SANA-Sprint's pipeline: 2)
    # perturbed-attention guidance when a call does not say (PixArtSigmaPAGPipeline: 3.0, [1])
    default_pag: tuple[float, tuple[int, ...]] = (0.0, ())

    def __post_init__(self) -> None:
        self._compiled: dict[Any, Any] = {}
        self._control_loras: dict[str, Any] = {}  # EasyControl condition LoRAs, by name
        self._loras: dict[str, Any] = {}  # adapter name -> jdit adapter tree
        self._active: dict[str, float] = {}  # the adapters applied (unmerged) and their weights
        self._enabled = True
        self._unfused: Any = None  # the transformer's weights before fuse_lora
        if self.text_encoders is not None and not self.text_encoders:
            raise ValueError("text_encoders is an empty list; give one or more PromptEncoders "
                             "(or None for the pipeline's own text_encoder)")
        if self.mesh is not None:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            for name in ("transformer_params", "text_encoder_params", "vae_params"):
                setattr(self, name, jax.device_put(getattr(self, name), replicated))
            for enc in self.text_encoders or ():
                enc.params = jax.device_put(enc.params, replicated)

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *, dtype: Any = jnp.float32,
                        text_dtype: Any = jnp.float32, vae_dtype: Any = jnp.float32,
                        param_dtype: Any = jnp.float32, mesh: Mesh | None = None,
                        revision: str | None = None,
                        **transformer_overrides: Any) -> TextToImage:
        """Load a diffusers ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline`` / ``SanaPipeline``
        folder, or a hub repo id (downloaded with ``huggingface_hub`` when online). ``dtype`` is the
        transformer's compute dtype; the text encoder and the VAE default to float32.
        ``param_dtype`` stores the transformer's and T5's weights (bfloat16 halves T5-XXL's 19 GB;
        the VAE keeps float32 weights). With a ``mesh``, batches are split over its ``data``
        axis."""
        from jdit import autoencoders, models, text

        folder = hub.resolve(path_or_repo_id, revision)
        index = hub.model_index(folder)
        name = index["_class_name"]
        if name not in PIPELINE_CLASSES:
            raise ValueError(f"{folder}: pipeline class {name!r} is not a text-to-image pipeline "
                             f"jdit loads; expected one of {sorted(PIPELINE_CLASSES)}")
        missing = [c for c in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
                   if not (folder / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder}: pipeline folder without {missing}")
        transformer, t_params = models.from_pretrained(folder / "transformer", dtype=dtype,
                                                       param_dtype=param_dtype,
                                                       **transformer_overrides)
        spec = PIPELINE_CLASSES[name]
        if name == "SanaSprintPipeline" and not getattr(transformer, "guidance_embeds", False):
            raise ValueError(f"{folder}: a SanaSprintPipeline needs a transformer that embeds the "
                             f"guidance scale (guidance_embeds in its config); this one does not")
        encoder, e_params = text.from_pretrained(folder / "text_encoder", dtype=text_dtype,
                                                 param_dtype=param_dtype,
                                                 hidden_layer=spec.get("hidden_layer"))
        tokenizers = {"t5": text.T5Tokenizer, "gemma2": text.GemmaTokenizer}
        tokenizer = tokenizers[spec["text"]].from_pretrained(folder / "tokenizer")
        vae, v_params = autoencoders.from_pretrained(folder / "vae", dtype=vae_dtype)
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        scheduler = from_diffusers_config(sched)
        if spec.get("sigmas") == "linspace":  # the pipeline passes its own sigmas
            scheduler = dataclasses.replace(scheduler, schedule=dataclasses.replace(
                scheduler.schedule, grid="linspace"))
        if "template" in spec:  # an LLM prompt encoder with its template (Lumina-Image 2.0)
            from jdit.pipelines.prompts import PromptEncoder

            prompt_encoder = PromptEncoder(encoder, e_params, tokenizer,
                                           spec["max_sequence_length"], template=spec["template"])
            return cls(transformer, t_params, encoder, e_params, tokenizer, vae, v_params,
                       scheduler, spec["max_sequence_length"], spec["bins"], mesh,
                       text_encoders=[prompt_encoder],
                       cfg_normalization=spec["cfg_normalization"],
                       cfg_trunc_ratio=spec["cfg_trunc_ratio"])
        controlnet, c_params = None, None
        if name in CONTROLNET_PIPELINES:
            if not (folder / "controlnet").is_dir():
                raise FileNotFoundError(f"{folder}: a {name} without controlnet/")
            # PixArt-δ's folder records no dimensions: its heads are the base's
            heads = ({"num_heads": transformer.num_heads}
                     if name == "PixArtAlphaControlnetPipeline" else {})
            controlnet, c_params = models.from_pretrained(folder / "controlnet", dtype=dtype,
                                                          param_dtype=param_dtype, **heads)
        return cls(transformer, t_params, encoder, e_params, tokenizer, vae, v_params,
                   scheduler, spec["max_sequence_length"], spec["bins"], mesh,
                   spec["instruction"], controlnet, c_params,
                   default_steps=spec.get("num_steps", 20),
                   default_pag=(spec.get("pag_scale", 0.0), spec.get("pag_layers", ())))

    # -- control (jdit.control) -------------------------------------------------------------

    def load_control_lora(self, path: str | Path, adapter_name: str | None = None) -> str:
        """Load an EasyControl condition LoRA (a file ``jdit convert --lora`` wrote from a
        control run, or any LoRA file :func:`jdit.lora.load` reads); returns its name. Each
        ``control_image`` of a call goes with one loaded condition LoRA, in load order (or as
        ``control_adapters`` names them)."""
        from jdit import control, lora

        if not control.supports(self.transformer):
            raise ValueError(f"{type(self.transformer).__name__} has no condition branch "
                             "(EasyControl runs on PixArt and SANA)")
        tree, _ = lora.load(path, self.transformer)
        name = adapter_name or Path(path).stem
        if name in self._control_loras:
            raise ValueError(f"a control LoRA named {name!r} is already loaded")
        self._control_loras[name] = tree
        return name

    def unload_control_loras(self) -> None:
        self._control_loras = {}

    def load_controlnet(self, path: str | Path, dtype: Any = None) -> None:
        """Attach a ControlNet-Transformer for this pipeline's transformer: a diffusers
        ``SanaControlNetModel`` / ``PixArtControlNetAdapterModel`` folder, an official file
        (SANA's ``SanaMSControlNet``, PixArt-δ's), or a jdit checkpoint. Dimensions a file does
        not record (heads, the latent grid) are the transformer's; ``dtype``: the compute dtype
        (default: the transformer's)."""
        from jdit import models
        from jdit.models.pixart import PixArt
        from jdit.models.sana import Sana

        t = self.transformer
        if isinstance(t, Sana):
            facts = dict(num_heads=t.num_heads, cross_num_heads=t.cross_num_heads,
                         input_size=t.input_size)
            want = "SanaControlNet"
        elif isinstance(t, PixArt):
            facts, want = dict(num_heads=t.num_heads), "PixArtControlNet"
        else:
            raise ValueError(f"{type(t).__name__} takes no ControlNet (PixArt and SANA do)")
        module, params = models.from_pretrained(
            path, dtype=t.dtype if dtype is None else dtype, param_dtype=t.param_dtype, **facts)
        if type(module).__name__ != want:
            raise ValueError(f"{path}: a {type(module).__name__}, not a ControlNet for this "
                             f"{type(t).__name__} (a {want})")
        if module.hidden_size != t.hidden_size:
            raise ValueError(f"{path}: a ControlNet {module.hidden_size} wide for a transformer "
                             f"{t.hidden_size} wide")
        if self.mesh is not None:
            params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
        self.controlnet, self.controlnet_params = module, params
        self._compiled.clear()

    def unload_controlnet(self) -> None:
        self.controlnet, self.controlnet_params = None, None
        self._compiled.clear()

    # -- LoRA (diffusers' method names and meanings) ----------------------------------------

    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None,
                          scale: float = 1.0) -> str:
        """Load a diffusers / PEFT LoRA file or folder, or a LoRA ``jdit convert --lora`` wrote,
        for the transformer (:func:`jdit.lora.read`) and make it the active adapter at
        ``scale``; returns its name (``default_<n>`` unless given). Applied unmerged: no weight
        is changed, :meth:`set_adapters` re-weights without recompiling."""
        from jdit import lora

        _check_scale(scale)
        name = adapter_name if adapter_name is not None else f"default_{len(self._loras)}"
        if name in self._loras:
            raise ValueError(f"an adapter named {name!r} is already loaded; pick another "
                             "adapter_name or delete_adapters it first")
        adapters, _ = lora.load(path, self.transformer)
        if self.mesh is not None:
            adapters = jax.device_put(adapters, NamedSharding(self.mesh, PartitionSpec()))
        self._loras[name] = adapters
        self._active = {name: float(scale)}
        return name

    def set_adapters(self, adapter_names: str | Sequence[str],
                     adapter_weights: float | Sequence[float] | None = None) -> None:
        """Use these loaded adapters together, with these weights (default 1.0 each)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, int | float):
            weights = [float(adapter_weights)] * len(names)
        else:
            weights = [float(w) for w in adapter_weights]
        if len(weights) != len(names):
            raise ValueError(f"{len(weights)} adapter weights for {len(names)} adapters")
        unknown = [n for n in names if n not in self._loras]
        if unknown:
            raise ValueError(f"no adapters named {unknown}; loaded: {sorted(self._loras)}")
        for w in weights:
            _check_scale(w)
        self._active = dict(zip(names, weights, strict=True))

    def get_active_adapters(self) -> list[str]:
        return list(self._active) if self._enabled else []

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {"transformer": list(self._loras)}

    def disable_lora(self) -> None:
        """Run the base transformer (the adapters stay loaded; :meth:`enable_lora` restores)."""
        self._enabled = False

    def enable_lora(self) -> None:
        self._enabled = True

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            if n not in self._loras:
                raise ValueError(f"no adapter named {n!r}; loaded: {sorted(self._loras)}")
            del self._loras[n]
            self._active.pop(n, None)

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None
                  ) -> None:
        """Merge the active adapters (or ``adapter_names``), each at its weight times
        ``lora_scale``, into the transformer's weights: no adapter cost per step afterwards.
        :meth:`unfuse_lora` restores the weights from before."""
        from jdit import lora

        _check_scale(lora_scale)
        names = list(self._active) if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self._loras]
        if unknown or not names:
            raise ValueError(f"nothing to fuse: adapters {unknown or names} "
                             f"(loaded: {sorted(self._loras)})")
        if self._unfused is None:
            self._unfused = self.transformer_params
        weights = [self._active.get(n, 1.0) * float(lora_scale) for n in names]
        self.transformer_params = jax.jit(lora.merge)(
            self.transformer_params, [self._loras[n] for n in names], weights)
        for n in names:
            self._active.pop(n, None)

    def unfuse_lora(self) -> None:
        """The transformer's weights as before :meth:`fuse_lora`."""
        if self._unfused is not None:
            self.transformer_params, self._unfused = self._unfused, None

    def unload_lora_weights(self) -> None:
        """Remove every adapter (fused ones included): the base pipeline again."""
        self.unfuse_lora()
        self._loras, self._active = {}, {}

    def _transformer_params(self) -> Any:
        from jdit import lora

        if not self._enabled or not self._active:
            return self.transformer_params
        names = list(self._active)
        return lora.apply(self.transformer_params, [self._loras[n] for n in names],
                          [jnp.float32(self._active[n]) for n in names])

    # -- pieces ----------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return int(self.vae.scale_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.in_channels)

    def _prompt_tokens(self, texts: list[str], negs: list[str]) -> tuple[Any, ...]:
        """``text_encoders``' tokens of the prompts and negative prompts (tuples, one entry per
        encoder) and each one's instruction positions."""
        pos = [e.tokens(texts) for e in self.text_encoders or []]
        neg = [e.tokens(negs, negative=True) for e in self.text_encoders or []]
        return (tuple(i for i, _, _ in pos), tuple(m for _, m, _ in pos),
                tuple(i for i, _, _ in neg), tuple(m for _, m, _ in neg),
                tuple((a, b) for (_, _, a), (_, _, b) in zip(pos, neg, strict=True)))

    def tokenize(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = self.tokenizer(texts, max_length=max_length)
        return (np.asarray(tokens["input_ids"], np.int32),
                np.asarray(tokens["attention_mask"], np.int32))

    def _denoise_fn(self, x: Array, t: Array, params: Any, ctx: Array, mask: Array,
                    extra: dict[str, Any], *micro: Array, module: Any = None) -> Array:
        """``extra``: a condition cache (``control``, EasyControl) or a ControlNet's parameters,
        condition latents and scale (``controlnet``), run at every step."""
        kwargs: dict[str, Any] = {}
        if micro:
            kwargs = {"resolution": micro[0], "aspect_ratio": micro[1]}
        if "control" in extra:
            kwargs["control"] = extra["control"]
        if "guidance" in extra:  # a model that embeds the guidance scale (SANA-Sprint)
            kwargs["guidance"] = extra["guidance"]
        if "perturb" in extra:  # perturbed-attention guidance's rows
            kwargs["perturb"] = extra["perturb"]
        if "controlnet" in extra:
            from jdit.control.controlnet import residuals

            cn = extra["controlnet"]
            kwargs["block_residuals"] = residuals(
                self.controlnet, cn["params"], self.transformer, params, x, t, ctx, mask,
                cn["condition"], cn["scale"], **kwargs)
        return (module or self.transformer).apply({"params": params}, x, t, context=ctx,
                                                  context_mask=mask, **kwargs)

    def _program(self, solver: str, num_steps: int, guided: bool, spec: SamplerSpec,
                 decode: bool, tiling: tuple[str, int] | None = None, control: str = "",
                 drops: tuple[tuple[int, int], ...] = (), cfg: tuple[bool, float] = (False, 1.0),
                 options: tuple[tuple[str, Any], ...] = (),
                 pag: tuple[tuple[int, ...], float] | None = None, step_cache: Any = None) -> Any:
        """encode → sample → decode, jitted once per static signature. ``control``:
        ``"easycontrol"`` (condition branches run once, their cache carried into the sampler),
        ``"controlnet"`` (the ControlNet runs at every step) or ``""``. ``drops``: with
        ``text_encoders``, each one's instruction positions (prompt, negative prompt);
        ``cfg``: (normalisation, truncation ratio) of the guidance; ``options``: the solver's;
        ``pag``: perturbed-attention guidance's (blocks, adaptive scale); ``step_cache``: a
        :mod:`jdit.sampling.cache` cache."""
        sig = (solver, num_steps, guided, spec, decode, tiling, control, drops, cfg, options, pag,
               step_cache)
        if sig in self._compiled:
            return self._compiled[sig]
        model_fn: Any = self._denoise_fn
        if step_cache is not None:
            if control or pag is not None or self.text_encoders is not None or \
                    cfg != (False, 1.0) or self.embeds_guidance:
                raise ValueError("a step cache goes with plain text-to-image sampling (no "
                                 "control, PAG, LLM encoders or CFG normalisation)")
            model_fn = self._staged()
        if pag is not None:
            if control or self.text_encoders is not None or cfg != (False, 1.0):
                raise ValueError("perturbed-attention guidance goes with plain text-to-image "
                                 "sampling (no control, LLM encoders or CFG normalisation)")
            perturbed = self.transformer.clone(pag_layers=pag[0])
            model_fn = PerturbedAttentionGuidance(
                functools.partial(self._denoise_fn, module=perturbed), cfg=guided,
                adaptive=pag[1])
        elif guided:
            model_fn = ClassifierFreeGuidance(
                model_fn, interval=guidance_interval(spec, solver, num_steps, cfg[1]),
                rescale_axis=2 if cfg[0] else None)  # NHWC's W: the last axis of diffusers' NCHW

        def run(params: dict[str, Any], ids: Any, mask: Any, neg_ids: Any,
                neg_mask: Any, noise: Array, scale: Array, micro: tuple[Array, ...],
                key: Array, conditions: dict[str, Any], step_noise: Array | None,
                pag_scale: Array) -> Array:
            extra = self._control_inputs(params, conditions, control, micro, guided)
            if self.embeds_guidance:
                extra = {**extra, "guidance": jnp.full((noise.shape[0],), scale, jnp.float32)}
            if self.text_encoders is not None:
                ctx, mask = self._encode_prompts(params["text_encoders"], ids, mask,
                                                 [d for d, _ in drops])
            else:
                encode = self.text_encoder.apply
                ctx = encode({"params": params["text_encoder"]}, ids, mask)
            if self.text_encoders is None and self.instruction is not None:
                # SANA: keep the first and the last L - 1 positions
                keep = jnp.asarray([0] + list(range(ids.shape[1] - neg_ids.shape[1] + 1,
                                                    ids.shape[1])))
                ctx, mask = ctx[:, keep], mask[:, keep]
            if guided:
                if self.text_encoders is not None:
                    neg, neg_mask = self._encode_prompts(params["text_encoders"], neg_ids,
                                                         neg_mask, [d for _, d in drops])
                else:
                    neg = encode({"params": params["text_encoder"]}, neg_ids, neg_mask)
                ctx, mask = jnp.concatenate([neg, ctx]), jnp.concatenate([neg_mask, mask])
                if pag is None:
                    micro = tuple(jnp.concatenate([m, m]) for m in micro)
                    args: tuple[Any, ...] = (scale, params["transformer"], ctx, mask, extra,
                                             *micro)
            else:
                args = (params["transformer"], ctx, mask, extra, *micro)
            if pag is not None:  # [uncond;] cond; perturbed (the cond's prompt, identity attn)
                b = noise.shape[0]
                n = 3 if guided else 2
                # ctx is [negative; prompt] when guided: append the prompt once more
                ctx, mask = jnp.concatenate([ctx, ctx[-b:]]), jnp.concatenate([mask, mask[-b:]])
                micro = tuple(jnp.concatenate([m] * n) for m in micro)
                perturb = jnp.arange(n * b) >= (n - 1) * b
                args = (scale, pag_scale, params["transformer"], ctx, mask,
                        {**extra, "perturb": perturb}, *micro)
            latents = sample(model_fn, noise, solver=solver, num_steps=num_steps,
                             schedule=spec.schedule, prediction=spec.prediction,
                             variance=spec.variance, args=args, solver_options=dict(options),
                             key=key if solver in STOCHASTIC else None, step_noise=step_noise,
                             cache=step_cache)
            if step_cache is not None:  # (latents, the cache's counts)
                latents = latents[0]
            if not decode:
                return latents
            return self.decode(params["vae"], latents, tiling)

        self._compiled[sig] = jax.jit(run)
        return self._compiled[sig]

    def _staged(self) -> Any:
        """The transformer in stages for a step cache (:mod:`jdit.sampling.cache`; PixArt)."""
        from jdit.models.pixart import PixArt
        from jdit.sampling.cache import Staged

        m = self.transformer
        if not isinstance(m, PixArt):
            raise ValueError(f"step caches run PixArt transformers in stages; not "
                             f"{type(m).__name__} yet")

        def run(branch: str, x: Array, t: Array, params: Any, ctx: Array, mask: Array,
                extra: dict[str, Any], *micro: Array, state: Any = None) -> Any:
            kw = {"resolution": micro[0], "aspect_ratio": micro[1]} if micro else {}
            return m.apply({"params": params}, x, t, context=ctx, context_mask=mask,
                           _branch=branch, _state=state, **kw)

        def front(x: Array, t: Array, *args: Any) -> tuple[Array, Array, Any]:
            state = run("front", x, t, *args)
            return state["h"], state["r"], state

        def rest(h: Array, state: Any, x: Array, t: Array, *args: Any) -> Array:
            return run("rest", x, t, *args, state={**state, "h": h})

        def final(h: Array, state: Any, x: Array, t: Array, *args: Any) -> Array:
            return run("final", x, t, *args, state={**state, "h": h})

        if not hasattr(self, "_staged_model"):  # one object: the sampler compiles once
            self._staged_model = Staged(front, rest, final, int(m.depth))
        return self._staged_model

    def _encode_prompts(self, params: list[Any], ids: tuple[Array, ...], mask: tuple[Array, ...],
                        drops: list[int]) -> tuple[Array, Array]:
        """``text_encoders``' features of one set of prompts, packed when there are several."""
        from jdit.pipelines.prompts import pack

        return pack([enc.features(p, i, m, d) for enc, p, i, m, d in
                     zip(self.text_encoders or [], params, ids, mask, drops, strict=True)])

    def _control_inputs(self, params: dict[str, Any], conditions: dict[str, Any], control: str,
                        micro: tuple[Array, ...], guided: bool) -> dict[str, Any]:
        """Inside the program, before the sampler: the conditions' latents, and for EasyControl
        their cache (every condition branch run once for all steps and both guidance halves)."""
        from jdit import control as easycontrol
        from jdit.pipelines.control import encode_images

        if not control:
            return {}
        latents = [encode_images(self.vae, params["vae"], im) for im in conditions["images"]]
        halves = 2 if guided else 1
        if control == "controlnet":
            (cond,) = latents
            return {"controlnet": {"params": params["controlnet"], "scale": conditions["scales"][0],
                                   "condition": jnp.concatenate([cond] * halves)}}
        kwargs = {"resolution": micro[0], "aspect_ratio": micro[1]} if micro else {}
        made = easycontrol.encode(self.transformer, params["transformer"], [
            easycontrol.Condition(z, ad, s) for z, ad, s in
            zip(latents, conditions["adapters"], conditions["scales"], strict=True)], **kwargs)
        return {"control": easycontrol.repeat(made, halves)}

    def decode(self, vae_params: Any, latents: Array, tiling: tuple[str, int] | None = None
               ) -> Array:
        """Latents as the transformer sees them → images in [0, 1] (NHWC, float32).
        ``tiling``: ``("blended" | "exact", tile in latents)`` or None (whole)."""
        from jdit import autoencoders

        scale = float(self.vae.scaling_factor)
        shift = float(getattr(self.vae, "shift_factor", None) or 0.0)
        z = latents / scale + shift
        if tiling is None:
            images = self.vae.apply({"params": vae_params}, z, method="decode")
        elif tiling[0] == "exact":
            images = autoencoders.decode_tiled_exact(self.vae, vae_params, z, tile=tiling[1])
        else:
            images = autoencoders.decode_tiled(self.vae, vae_params, z, tile=tiling[1],
                                               overlap=tiling[1] // 4)
        return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    def _batch_sharded(self, x: np.ndarray | Array, axis: int = 0) -> Array:
        """``x`` split over the mesh's ``data`` axis along its batch ``axis`` (if it divides)."""
        if self.mesh is None or "data" not in self.mesh.axis_names:
            return jnp.asarray(x)
        n = self.mesh.shape["data"]
        spec = (PartitionSpec(*([None] * axis), "data") if x.shape[axis] % n == 0
                else PartitionSpec())
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def _conditions(self, images: Any, scale: Any, names: Any, size: Any, batch: int,
                    height: int, width: int) -> tuple[str, dict[str, Any]]:
        """The call's control inputs: ``(kind, conditions)`` for :meth:`_program`."""
        from jdit.pipelines.control import control_images, scales_for

        if images is None:
            return "", {}
        if self.controlnet is not None:
            ims = control_images(images, batch, height, width)
            if len(ims) != 1:
                raise ValueError(f"a ControlNet takes one control image, got {len(ims)}")
            return "controlnet", {"images": [jnp.asarray(ims[0])],
                                  "scales": [jnp.float32(s) for s in scales_for(scale, 1)]}
        if not self._control_loras:
            raise ValueError("control_image needs a ControlNet pipeline or condition LoRAs "
                             "(load_controlnet, load_control_lora)")
        h, w = (height, width) if size is None else size
        check_size(h, w, self.vae_scale_factor * int(self.transformer.patch_size))
        ims = control_images(images, batch, h, w)
        chosen = list(self._control_loras) if names is None else (
            [names] if isinstance(names, str) else list(names))
        unknown = [n for n in chosen if n not in self._control_loras]
        if unknown:
            raise ValueError(f"no control LoRA named {unknown}; loaded: "
                             f"{list(self._control_loras)}")
        if names is None:
            chosen = chosen[: len(ims)]
        if len(chosen) != len(ims):
            raise ValueError(f"{len(ims)} control images for {len(chosen)} condition LoRAs")
        return "easycontrol", {"images": [jnp.asarray(a) for a in ims],
                               "adapters": [self._control_loras[n] for n in chosen],
                               "scales": [jnp.float32(s) for s in scales_for(scale, len(ims))]}

    # -- generation ------------------------------------------------------------------------

    def _pag_settings(self, scale: float | None, layers: Sequence[int | str] | None,
                      adaptive: float) -> tuple[tuple[int, ...], float] | None:
        """(blocks, adaptive scale) of perturbed-attention guidance, or None when it is off."""
        scale = self.default_pag[0] if scale is None else scale
        if not isinstance(scale, int | float) or not np.isfinite(scale) or scale < 0:
            raise ValueError(f"pag_scale must be a finite number >= 0, got {scale!r}")
        if scale == 0:
            return None
        raw = self.default_pag[1] if layers is None else layers
        if isinstance(raw, str | int):
            raw = [raw]
        blocks = []
        for layer in raw:
            text = str(layer)
            index = text.rsplit(".", 1)[-1] if text.startswith(("blocks.", "transformer_blocks.")) \
                else text
            if not index.isdigit():
                raise ValueError(f"pag_applied_layers: {layer!r} is not a block index or "
                                 f"'blocks.N'")
            blocks.append(int(index))
        depth = int(getattr(self.transformer, "depth", 0))
        if not blocks or any(i >= depth for i in blocks):
            raise ValueError(f"pag_applied_layers {list(raw)}: expected block indices below the "
                             f"transformer's {depth}")
        if "pag_layers" not in {f.name for f in dataclasses.fields(self.transformer)}:
            raise ValueError(f"perturbed-attention guidance needs a PixArt or SANA transformer, not "
                             f"{type(self.transformer).__name__}")
        if not np.isfinite(adaptive) or adaptive < 0:
            raise ValueError(f"pag_adaptive_scale must be >= 0, got {adaptive!r}")
        return tuple(sorted(set(blocks))), float(adaptive)

    @property
    def embeds_guidance(self) -> bool:
        """The transformer takes the guidance scale as an input (SANA-Sprint) instead of
        being guided by a second, unconditional pass."""
        return bool(getattr(self.transformer, "guidance_embeds", False))

    def __call__(self, prompts: str | Sequence[str], num_steps: int | None = None,
                 guidance_scale: float = 4.5, height: int | None = None, width: int | None = None,
                 seed: int = 0, latents: Array | np.ndarray | None = None,
                 negative_prompt: str | Sequence[str] = "", solver: str | None = None,
                 max_sequence_length: int | None = None, output_type: str = "np", *,
                 num_images_per_prompt: int = 1, use_resolution_binning: bool = True,
                 vae_tiling: str | None = None, vae_tile: int = 64, control_image: Any = None,
                 control_scale: float | Sequence[float] = 1.0,
                 control_adapters: str | Sequence[str] | None = None,
                 control_size: tuple[int, int] | None = None,
                 cfg_normalization: bool | None = None, cfg_trunc_ratio: float | None = None,
                 step_noise: Array | np.ndarray | None = None,
                 solver_options: dict[str, Any] | None = None,
                 timesteps: Sequence[int] | None = None, pag_scale: float | None = None,
                 pag_applied_layers: Sequence[int | str] | None = None,
                 pag_adaptive_scale: float = 0.0, step_cache: Any = None
                 ) -> np.ndarray | list[Any]:
        """Images for ``prompts``: ``np`` (B, H, W, 3) float32 in [0, 1], ``pil`` a list of
        PIL images, or ``latent`` the final latents (B, h, w, C), NHWC. ``num_steps`` defaults
        to the pipeline's (20; SANA-Sprint 2). A transformer that embeds the guidance scale
        (SANA-Sprint) gets ``guidance_scale`` as an input, in one pass and without a negative
        prompt. ``height``/``width``
        default to the model's training size; with ``use_resolution_binning`` the image is
        generated at the nearest PixArt aspect-ratio bucket and resized and cropped back.
        ``latents`` (standard normal, (B, H/8, W/8, C)) replace the noise drawn from ``seed``.
        ``solver`` None uses the folder's scheduler, else any jdit solver on its schedule.
        ``vae_tiling`` for 2K / 4K images: ``"blended"`` (overlapping ``vae_tile`` latent tiles
        blended, per-tile GroupNorm) or ``"exact"`` (equal to the whole decode, several times
        its compute; :func:`jdit.autoencoders.decode_tiled_exact`).

        ``control_image``: a condition (PIL image or array, [0, 1] floats or uint8; one for all
        images or one per image) or a list of several. With a ControlNet (a
        ``SanaControlNetPipeline``) one condition at the generated size, ``control_scale``
        being diffusers' ``controlnet_conditioning_scale``; with condition LoRAs
        (:meth:`load_control_lora`) one condition per LoRA (``control_adapters`` names them,
        default: load order), ``control_scale`` one weight or one per condition, each encoded
        at ``control_size`` (height, width; default the generated size: EasyControl's
        position-aware interpolation places a smaller condition on the whole image).

        ``cfg_normalization`` (default: the pipeline's; Lumina-Image 2.0's True) rescales the
        guided prediction to the conditional one's norm over the latent width, as diffusers'
        ``Lumina2Pipeline``; ``cfg_trunc_ratio`` guides only the steps ``i`` with
        ``(i + 1) / num_steps <= ratio`` (the high-noise ones; 1.0: all).

        Stochastic solvers (``ddpm``, ``sa-solver``, ``lcm``) draw their per-step noise from
        ``seed``, or take it from ``step_noise``: (num_steps, B, h, w, C) standard-normal draws
        (NHWC latents), entry i the noise drawn at step i, so that results can be compared
        with diffusers given the same draws. ``solver_options`` override the scheduler's
        (:data:`jdit.sampling.sample.SOLVER_OPTIONS`; e.g. SANA-Sprint's ``max_timestep`` and
        ``intermediate_timestep``: the diffusers pipeline's ``max_timesteps`` and
        ``intermediate_timesteps``). ``timesteps``: a custom descending grid for the ``ddpm``
        solver, one per step (diffusers' ``timesteps=``; PixArt-DMD: ``[400]``, one step).

        ``pag_scale`` > 0 adds perturbed-attention guidance (diffusers' PAG pipelines; PixArt):
        a third branch, the prompt's, with identity self-attention in the blocks
        ``pag_applied_layers`` (ints, or diffusers' ``"blocks.14"`` / ``"transformer_blocks.8"``),
        guiding by ``pag_scale ×
        (cond − perturbed)``, lowered by ``pag_adaptive_scale × (1000 − t)`` (never below 0).
        Defaults: the pipeline's (``PixArtSigmaPAGPipeline``: 3.0 at block 1;
        ``SanaPAGPipeline``: 3.0 at block 0; others: off).

        ``step_cache``: a :mod:`jdit.sampling.cache` cache (``FirstBlockCache(0.2)``, ...)
        skipping most of the transformer on steps where it would change little (PixArt)."""
        if output_type not in ("np", "pil", "latent"):
            raise ValueError(f"output_type must be 'np', 'pil' or 'latent', got {output_type!r}")
        if vae_tiling not in (None, "blended", "exact"):
            raise ValueError(f"vae_tiling must be None, 'blended' or 'exact', got {vae_tiling!r}")
        if timesteps is not None:
            timesteps = tuple(int(t) for t in timesteps)
            if num_steps is not None and num_steps != len(timesteps):
                raise ValueError(f"num_steps={num_steps} but {len(timesteps)} timesteps given")
            num_steps = len(timesteps)
            solver_options = {**(solver_options or {}), "timesteps": timesteps}
        num_steps = self.default_steps if num_steps is None else num_steps
        if self.embeds_guidance and not (isinstance(negative_prompt, str) and not negative_prompt):
            raise ValueError("this transformer embeds the guidance scale (SANA-Sprint): it is "
                             "not guided by a negative prompt; leave negative_prompt empty")
        check_generation(num_steps=num_steps, guidance_scale=guidance_scale, seed=seed,
                         num_images_per_prompt=num_images_per_prompt)
        texts = [t for t in _texts(prompts) for _ in range(num_images_per_prompt)]
        negs = _texts(negative_prompt) if not isinstance(negative_prompt, str) else [
            negative_prompt.lower().strip()] * len(_texts(prompts))
        negs = [t for t in negs for _ in range(num_images_per_prompt)]
        if len(negs) != len(texts):
            raise ValueError(f"{len(negs)} negative prompts for {len(texts)} images")
        raw_texts = [t for t in _texts(prompts, lower=False) for _ in range(num_images_per_prompt)]
        raw_negs = [t for t in (_texts(negative_prompt, lower=False) if not isinstance(
            negative_prompt, str) else [negative_prompt] * len(_texts(prompts)))
            for _ in range(num_images_per_prompt)]
        cfg_normalization = (self.cfg_normalization if cfg_normalization is None
                             else bool(cfg_normalization))
        cfg_trunc_ratio = self.cfg_trunc_ratio if cfg_trunc_ratio is None else cfg_trunc_ratio
        if not 0.0 <= float(cfg_trunc_ratio) <= 1.0:
            raise ValueError(f"cfg_trunc_ratio must lie in [0, 1], got {cfg_trunc_ratio}")
        f = self.vae_scale_factor
        native = int(self.transformer.input_size) * f
        height = native if height is None else height
        width = native if width is None else width
        check_size(height, width, 1)
        orig = (height, width)
        sample_size = int(self.transformer.input_size)
        if use_resolution_binning and self.bins is not None:  # None: the pipeline never bins
            if sample_size not in self.bins:
                raise ValueError(f"no aspect-ratio bins for a transformer of sample size "
                                 f"{sample_size} (known: {sorted(self.bins)}); pass "
                                 f"use_resolution_binning=False")
            height, width = closest_bucket(height, width, TABLES[self.bins[sample_size]])
        check_size(height, width, f * int(self.transformer.patch_size))
        shape = (len(texts), height // f, width // f, self.latent_channels)
        if latents is None:
            noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        else:
            noise = jnp.asarray(check_latents(latents, shape))
        length = int(max_sequence_length or self.max_sequence_length)
        drops: tuple[tuple[int, int], ...] = ()
        if self.text_encoders is not None:  # LLM encoders: prompts as written
            if max_sequence_length is not None:
                raise ValueError("max_sequence_length is each PromptEncoder's max_length in a "
                                 "pipeline with text_encoders")
            ids, mask, neg_ids, neg_mask, drops = self._prompt_tokens(raw_texts, raw_negs)
        elif self.instruction is None:
            ids, mask = self.tokenize(texts, length)
            neg_ids, neg_mask = self.tokenize(negs, length)
        else:  # SANA: the instruction's tokens plus length - 2, reduced to length in the program
            extra = len(self.tokenizer.encode(self.instruction))
            ids, mask = self.tokenize([self.instruction + t for t in texts], extra + length - 2)
            neg_ids, neg_mask = self.tokenize(negs, length)
        micro: tuple[Array, ...] = ()
        if getattr(self.transformer, "micro_condition", False):
            micro = (jnp.tile(jnp.asarray([[height, width]], jnp.float32), (len(texts), 1)),
                     jnp.full((len(texts), 1), height / width, jnp.float32))
        spec = self.scheduler
        chosen = solver or spec.solver
        if step_noise is not None:
            if chosen not in STOCHASTIC:
                raise ValueError(f"solver {chosen!r} draws no noise between steps: step_noise "
                                 f"is for the stochastic solvers ({', '.join(STOCHASTIC)})")
            step_noise = check_latents(step_noise, (int(num_steps), *shape), "step_noise")
        guided = guidance_scale > 1.0 and not self.embeds_guidance
        pag = self._pag_settings(pag_scale, pag_applied_layers, pag_adaptive_scale)
        pag_scale = self.default_pag[0] if pag_scale is None else pag_scale
        tiling = None if vae_tiling is None else (vae_tiling, int(vae_tile))
        kind, conditions = self._conditions(control_image, control_scale, control_adapters,
                                            control_size, len(texts), height, width)
        options = dict(spec.options) if chosen == spec.solver else {}
        options = tuple(sorted({**options, **(solver_options or {})}.items()))
        run = self._program(chosen, int(num_steps), guided, spec, output_type != "latent", tiling,
                            kind, drops, (cfg_normalization, float(cfg_trunc_ratio)), options,
                            pag, step_cache)
        params = {"transformer": self._transformer_params(),
                  "text_encoder": self.text_encoder_params,
                  "vae": self.vae_params}
        if self.text_encoders is not None:
            params["text_encoders"] = [e.params for e in self.text_encoders]
        if kind == "controlnet":
            params["controlnet"] = self.controlnet_params
        batch = [jax.tree.map(self._batch_sharded, a)
                 for a in (ids, mask, neg_ids, neg_mask, noise)]
        out = run(params, *batch, jnp.float32(guidance_scale),
                  tuple(self._batch_sharded(m) for m in micro),
                  jax.random.fold_in(jax.random.key(seed), 1),  # the stochastic solvers' noise
                  conditions, None if step_noise is None else self._batch_sharded(step_noise, 1),
                  jnp.float32(pag_scale))
        if output_type == "latent":
            return np.asarray(out)
        if use_resolution_binning and (height, width) != orig:
            out = resize_and_crop(out, *orig)
        return to_output(np.asarray(out), output_type)
