"""Tasks: what a run trains on, how it conditions the model, and how it is evaluated.

A task gives deterministic batches by index (so a resumed run sees exactly the batches it would
have seen; ``batch(index, rows=(start, stop))`` is the part of the global batch one host feeds), the null condition for classifier-free guidance, conditions for sampling, and an
``evaluate`` that generates with a ``generate(conditions, key) -> images`` function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jdit.config import section
from jdit.text import WordEncoder

Generate = Callable[[dict[str, np.ndarray], int], np.ndarray]
Rows = tuple[int, int] | None


def generate_in_chunks(generate: Generate, conditions: dict[str, np.ndarray],
                       batch_size: int) -> np.ndarray:
    """``generate`` over ``conditions`` in chunks of ``batch_size``, chunk ``s`` seeded by its
    first row's index (so the images do not depend on what else is generated)."""
    def rows(v: Any, s: int) -> Any:  # a list holds several conditions, each with all rows
        return [a[s: s + batch_size] for a in v] if isinstance(v, list) else v[s: s + batch_size]

    first = next(iter(conditions.values()))
    n = len(first[0] if isinstance(first, list) else first)
    return np.concatenate([generate({k: rows(v, s) for k, v in conditions.items()}, s)
                           for s in range(0, n, batch_size)])


def _rows(rows: Rows, batch_size: int) -> slice:
    if rows is None:
        return slice(0, batch_size)
    start, stop = rows
    if not 0 <= start < stop <= batch_size:
        raise ValueError(f"rows {rows} do not lie within a batch of {batch_size}")
    return slice(start, stop)


class ShapesTask:
    """Captioned coloured shapes, a word-level text encoder, prompt-adherence evaluation."""

    kind = "text"

    def __init__(self, cfg: Mapping[str, Any], batch_size: int, seed: int) -> None:
        from jdit.data import shapes

        self.shapes = shapes
        cfg = section("data", cfg)
        self.size = int(cfg["size"])
        self.pair_fraction = float(cfg["pair_fraction"])
        self.concepts, self.new_fraction = str(cfg["concepts"]), float(cfg["new_fraction"])
        self.condition = cfg["condition"] or None  # a control condition style (jdit.control)
        if self.condition is not None and self.condition not in shapes.STYLES[1:]:
            raise ValueError(f"data.condition must be None or one of {shapes.STYLES[1:]}, got "
                             f"{self.condition!r}")
        # a share of two-object examples whose condition shows one object; their captions
        # (naming both) are never dropped, so an empty prompt still means "what the condition
        # shows", and a condition showing one object no longer means "nothing else"
        self.partial_condition = float(cfg["partial_condition"])
        # the conditions' side (EasyControl encodes a condition at a fixed, smaller size;
        # position-aware interpolation places it on the image): 0 = the image's
        self.condition_size = int(cfg["condition_size"]) or self.size
        if self.partial_condition and self.condition is None:
            raise ValueError("data.partial_condition needs data.condition")
        self.batch_size, self.seed = batch_size, seed
        # Every word of the vocabulary (colours, shapes, positions, "a"/"an", "and"); words are
        # not held out, only their combinations. The new concepts' words come after the base
        # words, which keep their vectors: a base model reads base prompts as it learned them.
        self.encoder = WordEncoder(tuple(shapes.vocabulary(extended=self.concepts == "new")),
                                   dim=int(cfg["text_dim"]), max_length=int(cfg["max_length"]))
        if cfg.get("text_encoders"):  # LLM prompt encoders instead (LI-DiT, jdit bench llm)
            from jdit.pipelines.encoders import text_encoders

            self.encoder = text_encoders([dict(e) for e in cfg["text_encoders"]])
        self.channels = 3

    def encode(self, captions: list[str]) -> dict[str, np.ndarray]:
        ctx, mask = self.encoder.encode(captions)
        return {"context": ctx, "context_mask": mask}

    def check_model(self, module: Any) -> None:
        """Refuse a model whose caption width (or text refiner) does not fit the encoders."""
        check_text_encoders(module, self.encoder)

    def batch(self, index: int, rows: Rows = None) -> dict[str, np.ndarray]:
        # Rendering a whole 32-pixel batch costs little; each host keeps its rows.
        b = self.shapes.batch(self.seed, index, self.batch_size, size=self.size,
                              pair_fraction=self.pair_fraction, concepts=self.concepts,
                              new_fraction=self.new_fraction, condition=self.condition,
                              partial=self.partial_condition)
        part = _rows(rows, self.batch_size)
        out = {"images": b["images"][part], **self.encode(list(b["captions"][part]))}
        if self.condition is not None:
            out["condition"] = self.shapes.resize(b["conditions"][part],
                                                  (self.condition_size,) * 2)
        if self.partial_condition:
            out["keep_caption"] = b["partial"][part]
        return out

    def null(self) -> dict[str, np.ndarray]:
        return self.encode([""])

    def preview(self) -> tuple[list[str], dict[str, np.ndarray]]:
        kinds = ["base"] if self.concepts == "base" else ["base", "new"]
        n = 8 // len(kinds)
        objects = [p for c in kinds for kind in ("single", "pair")
                   for p in self.shapes.prompts(kind, "heldout", concepts=c)[:n]]
        prompts = [self.shapes.caption(p) for p in objects]
        cond = self.encode(prompts)
        if self.condition is not None:  # the first half with their conditions, no caption
            cond = self.encode(["" if i < n else p for i, p in enumerate(prompts)])
            cond["condition"] = render_conditions(objects, self.condition, self.size,
                                                  condition_size=self.condition_size)
            prompts = [f"[{self.condition}] {p}" if i < n else p for i, p in enumerate(prompts)]
        return prompts, cond

    def evaluate(self, generate: Generate, batch_size: int = 64, num_pairs: int = 200,
                 single_repeats: int = 4, position_aware: bool = True) -> dict[str, float]:
        """``position_aware=False``: no other condition sizes or target shapes (a ControlNet
        reads its condition at the latents' size)."""
        if self.condition is not None:
            return shapes_control(generate, self.encode, self.condition, self.size, batch_size,
                                  num_pairs, single_repeats, self.condition_size,
                                  position_aware=position_aware)
        out = shapes_adherence(generate, self.encode, batch_size, num_pairs, single_repeats)
        if self.concepts == "new":
            out.update(shapes_adherence(generate, self.encode, batch_size, num_pairs,
                                        single_repeats, concepts="new"))
        return out


def render_conditions(objects: list[tuple[Any, ...]], style: str, size: int,
                      seed: int = 0, condition_size: int | None = None) -> np.ndarray:
    """Control conditions of ``objects`` (jittered as training images are, from ``seed``),
    float32 [-1, 1] (N, condition_size, condition_size, 3): drawn at the image's ``size``, then
    area-averaged to ``condition_size`` (default: ``size``)."""
    from jdit.data import shapes

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0D]))
    out = np.stack([shapes.to_float(shapes.render(o, size, rng, style)) for o in objects])
    return shapes.resize(out, (condition_size or size,) * 2)


def shapes_composition(generate: Generate, encode: Callable[[list[str]], dict[str, np.ndarray]],
                       styles: tuple[str, str], size: int, batch_size: int = 64,
                       num_pairs: int = 200, caption: bool = False,
                       condition_sizes: tuple[int, int] | None = None) -> dict[str, float]:
    """Zero-shot composition of two condition LoRAs trained apart: for each held-out pair
    prompt, the first object's condition in ``styles[0]`` and the second's in ``styles[1]``
    (``generate`` takes the two, in that order, as ``conditions["condition"]``).

    ``composition_pair``: an empty prompt; both objects' shapes and positions right, nothing
    else. With ``caption``, also ``composition_caption_pair``: the pair's caption with the two
    conditions; everything right, colours included. ``condition_sizes``: each condition's side
    (its run's ``data.condition_size``)."""
    from jdit.data import shapes
    from jdit.eval import shapes as evaluator

    pairs = list(shapes.prompts("pair", "heldout")[:num_pairs])
    sizes = condition_sizes or (size, size)
    conditions = [render_conditions([(p[i],) for p in pairs], styles[i], size, seed=i,
                                    condition_size=sizes[i]) for i in range(2)]
    out: dict[str, float] = {"num_pair_images": len(pairs)}
    for name, with_caption in (("composition_pair", False),
                               ("composition_caption_pair", True))[:1 + bool(caption)]:
        cond = encode([shapes.caption(p) if with_caption else "" for p in pairs])
        cond["condition"] = conditions
        images = generate_in_chunks(generate, cond, batch_size)
        out[name] = float(evaluator.adherence(images, pairs, ignore_color=not with_caption))
    return out


def shapes_control(generate: Generate, encode: Callable[[list[str]], dict[str, np.ndarray]],
                   style: str, size: int, batch_size: int = 64, num_pairs: int = 200,
                   single_repeats: int = 4, condition_size: int | None = None,
                   wide: tuple[int, int] | None = None, position_aware: bool = True
                   ) -> dict[str, float]:
    """Control accuracy of a condition (``style``) read by :mod:`jdit.eval.shapes`, on the
    held-out prompts (as :func:`shapes_adherence`), each with the condition of its layout
    (drawn at ``size``, encoded at ``condition_size``, default ``size``):

    * ``control_single`` / ``control_pair``: an empty prompt and the condition; every object's
      shape and position right (colour ignored), no extra object;
    * ``control_caption_single``: the caption and the condition, everything right (colour from
      the caption);
    * ``chance_single``: an empty prompt and no condition, scored as ``control_single`` (what
      the model draws unguided);
    * position-aware interpolation: ``control_single_half``, the condition at half the image's
      side; ``control_single_wide``, the square condition with a target of another aspect
      ratio (``wide``, default (size, 1.5 size)), read after resizing it back to the square;
      left out with ``position_aware=False``.
    """
    from jdit.data import shapes
    from jdit.eval import shapes as evaluator

    singles = shapes.prompts("single", "heldout") * single_repeats
    pairs = shapes.prompts("pair", "heldout")[:num_pairs]
    wide = wide or (size, size * 3 // 2)
    out: dict[str, float] = {}
    for name, objs, caption, cond_size, hw in (
            ("control_single", singles, False, condition_size, None),
            ("control_pair", pairs, False, condition_size, None),
            ("control_caption_single", singles, True, condition_size, None),
            ("chance_single", singles, False, 0, None),
            ("control_single_half", singles, False, size // 2, None),
            ("control_single_wide", singles, False, condition_size, wide)):
        if not position_aware and (hw is not None or name == "control_single_half"):
            continue
        cond = encode([shapes.caption(o) if caption else "" for o in objs])
        if cond_size != 0:
            cond["condition"] = render_conditions(list(objs), style, size,
                                                  condition_size=cond_size)
        gen = generate if hw is None else (lambda c, s, hw=hw: generate(c, s, hw=hw))
        images = generate_in_chunks(gen, cond, batch_size)
        if hw is not None:
            images = shapes.resize(images, (size, size))
        out[name] = float(evaluator.adherence(images, list(objs), ignore_color=not caption))
    out["num_single_images"], out["num_pair_images"] = len(singles), len(pairs)
    out["condition_size"] = condition_size or size
    if position_aware:
        out["wide_hw"] = list(wide)
    return out


def check_text_encoders(module: Any, encoder: Any) -> None:
    """The model's ``caption_channels`` and ``text_refiner`` against what ``encoder`` gives:
    clear errors for encoders whose feature widths (or token counts) the config does not
    match."""
    width = getattr(module, "caption_channels", None)
    refiner = getattr(module, "text_refiner", None)
    layout = getattr(encoder, "layout", None)  # several encoders, packed
    if layout is None:
        have = int(getattr(encoder, "width", None) or encoder.dim)
        layout = [(have, getattr(encoder, "max_length", None))]
    widths = [w for w, _ in layout]
    if len(layout) > 1 and refiner is None:
        raise ValueError(f"{len(layout)} text encoders (widths {widths}) need the model's "
                         f"text_refiner to split their packed features; set model.text_refiner")
    if width is not None and int(width) != max(widths):
        raise ValueError(f"the text encoders' features are {max(widths)} wide, the model "
                         f"expects {width} (model.caption_channels)")
    if refiner is not None:
        want = [(w, n) for w, n in refiner.encoders]
        if [w for w, _ in want] != widths or any(
                n is not None and n != g for (_, n), (_, g) in zip(want, layout, strict=True)):
            raise ValueError(f"model.text_refiner.encoders {want} do not match the text "
                             f"encoders' (width, tokens) {layout}")


def shapes_adherence(generate: Generate, encode: Callable[[list[str]], dict[str, np.ndarray]],
                     batch_size: int = 64, num_pairs: int = 200, single_repeats: int = 4,
                     concepts: str = "base") -> dict[str, float]:
    """Prompt adherence read by :mod:`jdit.eval.shapes`. adherence_single: every held-out single
    prompt ``single_repeats`` times, seeds differing (54 prompts, 216 images at the defaults: the
    whole single-object space has 8 x 3 x 9 = 216 prompts, a quarter held out); adherence_pair:
    ``num_pairs`` distinct held-out pair prompts, one image each (0: no pairs), with
    ``adherence_pair_first`` / ``_second``: how often the caption's first / second object is
    among those found in its cell.

    ``concepts="new"``: the same over the held-out prompts with a new colour or shape (27
    singles, 108 images; pairs as above), read by the extended evaluator, reported as
    ``adherence_new`` (singles) and ``adherence_new_pair``."""
    from jdit.data import shapes
    from jdit.eval import shapes as evaluator

    singles = shapes.prompts("single", "heldout", concepts=concepts) * single_repeats
    pairs = shapes.prompts("pair", "heldout", concepts=concepts)[:num_pairs]
    names = {"base": ("adherence_single", "adherence_pair"),
             "new": ("adherence_new", "adherence_new_pair")}[concepts]
    out: dict[str, float] = {}
    for name, kind, objs in ((names[0], "single", singles), (names[1], "pair", pairs)):
        if not objs:  # num_pairs=0: singles only
            continue
        cond = encode([shapes.caption(o) for o in objs])
        images = generate_in_chunks(generate, cond, batch_size)
        out[name] = float(evaluator.adherence(images, list(objs), extended=concepts == "new"))
        if kind == "pair":  # each object on its own, in the caption's order (LI-DiT's causal bias)
            found = evaluator.objects_found(images, list(objs), extended=concepts == "new")
            out[f"{name}_first"], out[f"{name}_second"] = (float(v) for v in found.mean(0))
        tag = kind if concepts == "base" else f"new_{kind}"
        out[f"num_{tag}_prompts"] = len(set(objs))
        out[f"num_{tag}_images"] = len(objs)
    return out


class DigitsTask:
    """scikit-learn's handwritten digits, class-conditional; classifier-based evaluation."""

    kind = "class"

    def __init__(self, cfg: Mapping[str, Any], batch_size: int, seed: int) -> None:
        from jdit.data import digits

        self.digits = digits
        self.size = int(section("data", cfg)["size"])
        self.batch_size, self.seed = batch_size, seed
        self.channels = 1

    def batch(self, index: int, rows: Rows = None) -> dict[str, np.ndarray]:
        b = self.digits.batch(self.seed, index, self.batch_size, size=self.size)
        part = _rows(rows, self.batch_size)
        return {"images": b["images"][part], "labels": np.asarray(b["labels"], np.int32)[part]}

    def null(self) -> None:
        return None

    def preview(self) -> tuple[list[str], dict[str, np.ndarray]]:
        labels = np.tile(np.arange(10, dtype=np.int32), 2)
        return [str(k) for k in labels], {"labels": labels}

    def evaluate(self, generate: Generate, batch_size: int = 100, per_class: int = 50
                 ) -> dict[str, float]:
        from jdit.eval import digits as digits_eval

        labels = np.repeat(np.arange(10, dtype=np.int32), per_class)
        images = generate_in_chunks(generate, {"labels": labels}, batch_size)
        return {k: float(v) for k, v in digits_eval.evaluate(images, labels).items()}


class FeatureCacheTask:
    """Pre-computed features (:mod:`jdit.data.cache`, written by ``jdit cache``): the path for
    real datasets.

    Each example holds ``latent`` (h, w, c), the VAE latent mean before scaling, and either
    ``text`` (L, D) + ``text_mask`` (L) from the text encoder or ``label`` (a class id). Every
    batch comes from one latent size (one aspect-ratio bucket, as the cache writer resized the
    images), planned by :class:`jdit.data.buckets.BucketBatchSampler`, so a batch depends only on
    (seed, step) and every host reads only its own slice.

    ``data`` config (:data:`jdit.config.DATA`): ``path`` (the cache directory), ``latent_scale``,
    ``null_caption`` (a ``.safetensors`` file with ``text`` and ``text_mask``: the encoded empty
    prompt for condition dropout), ``micro_condition`` (PixArt-α 1024: pass each batch's original
    image size and bucket ratio), ``vae_factor``, ``shuffle`` (default True: examples and batches
    shuffled per epoch from the seed; False: each bucket read in the cache's order, batches in
    bucket order). A cache ``jdit cache`` wrote records its
    encoders: a ``latent_scale`` or ``vae_factor`` other than its autoencoder's, or a model whose
    input channels or caption width differ from its features, is refused. Such a cache also
    gives sample grids during training (its preview captions, decoded with its VAE) and, for the
    embedded shapes data in pixel space, the prompt-adherence evaluation. A cache made with
    ``jdit cache --condition`` also holds each example's control ``condition`` (latents of the
    same VAE, scaled like the images): the data of a control run (``control.method``).
    """

    def __init__(self, cfg: Mapping[str, Any], batch_size: int, seed: int) -> None:
        from jdit.data.buckets import BucketBatchSampler
        from jdit.data.cache import FeatureCache

        cfg = section("data", cfg)
        if not cfg.get("path"):
            raise ValueError("data.path must name a feature cache directory (jdit cache)")
        self.path = Path(cfg["path"])
        self.cache = FeatureCache(cfg["path"])
        fields = set(self.cache.fields)
        if "latent" not in fields:
            raise ValueError(f"{cfg['path']}: a training cache needs a 'latent' field, has "
                             f"{sorted(fields)}")
        if {"text", "text_mask"} <= fields:
            self.kind = "text"
        elif "label" in fields:
            self.kind = "class"
        else:
            raise ValueError(f"{cfg['path']}: needs 'text' and 'text_mask' (text-to-image) or "
                             f"'label' (class-conditional) fields, has {sorted(fields)}")
        self.latent_scale = float(cfg["latent_scale"])
        self.vae_factor = int(cfg["vae_factor"])
        self.meta = self.cache.metadata
        self.autoencoder = self.meta.get("autoencoder")
        if self.autoencoder is not None:  # written by jdit cache: its facts must agree
            self._check_encoders()
        self.micro_condition = bool(cfg["micro_condition"])
        # control conditions (jdit cache --condition): what kind, for messages and previews
        self.condition = None
        if "condition" in fields:
            self.condition = str((self.meta.get("condition") or {}).get("kind", "condition"))
        self.condition_size = None  # stored at each image's own size
        self.null_path = cfg["null_caption"] or f"{cfg['path']}/null_caption.safetensors"
        self.batch_size = batch_size
        self.sampler = BucketBatchSampler(self.cache.sizes("latent"), batch_size, table=None,
                                          seed=seed, shuffle=bool(cfg["shuffle"]),
                                          shard_index=0, shard_count=1)
        self.channels = self.cache.shape(0, "latent")[-1]
        sizes, counts = np.unique(self.cache.sizes("latent"), axis=0, return_counts=True)
        self.sample_hw = tuple(int(v) for v in sizes[np.argmax(counts)])  # the commonest bucket
        self.size = self.sample_hw[0]
        self._decoder: Any = None

    def _check_encoders(self) -> None:
        ae, where = self.autoencoder, self.path
        if abs(self.latent_scale - float(ae["scaling_factor"])) > 1e-9:
            raise ValueError(
                f"{where}: the cache was encoded with {ae['kind']} {ae.get('source', '')} whose "
                f"latent scale is {ae['scaling_factor']}, but data.latent_scale is "
                f"{self.latent_scale}: set --config.data.latent_scale={ae['scaling_factor']} "
                "(or use a cache made for this model)")
        if int(ae["factor"]) != self.vae_factor and ae["kind"] != "identity":
            raise ValueError(f"{where}: the cache's autoencoder downsamples {ae['factor']}x, "
                             f"data.vae_factor is {self.vae_factor}")

    def check_model(self, module: Any) -> None:
        """Refuse a model whose inputs do not fit the cached features."""
        want = getattr(module, "in_channels", None)
        if want is not None and int(want) != self.channels:
            raise ValueError(f"{self.path}: the cache holds {self.channels}-channel latents, the "
                             f"model takes {want} channels (model.in_channels): a cache made "
                             "for another model")
        width = getattr(module, "caption_channels", None)
        if self.kind == "text" and width is not None:
            have = self.cache.shape(0, "text")[-1]
            if int(width) != have:
                raise ValueError(f"{self.path}: the cache's text features are {have} wide, the "
                                 f"model expects {width} (model.caption_channels): a cache made "
                                 "for another text encoder")

    def batch(self, index: int, rows: Rows = None) -> dict[str, np.ndarray]:
        chosen = self.sampler.batch(index)  # the global batch's plan; read only our rows
        examples = [self.cache[int(i)] for i in chosen.indices[_rows(rows, self.batch_size)]]
        latents = np.stack([e["latent"] for e in examples]).astype(np.float32)
        out = {"images": self._scaled(latents)}
        if self.condition is not None:
            out["condition"] = self._scaled(np.stack([e["condition"] for e in examples]))
        if self.kind == "text":
            out["context"] = np.stack([e["text"] for e in examples]).astype(np.float32)
            out["context_mask"] = np.stack([e["text_mask"] for e in examples]).astype(np.int32)
        else:
            out["labels"] = np.asarray([e["label"] for e in examples], np.int32).reshape(-1)
        if self.micro_condition:
            if "original_size" in examples[0]:  # PixArt trains on the original size and key
                out["resolution"] = np.stack([e["original_size"] for e in examples]
                                             ).astype(np.float32)
                out["aspect_ratio"] = np.array([[float(e["aspect_ratio"])] for e in examples],
                                               np.float32)
            else:
                h, w = (self.vae_factor * s for s in latents.shape[1:3])
                out["resolution"] = np.tile(np.float32([h, w]), (len(examples), 1))
                out["aspect_ratio"] = np.full((len(examples), 1), h / w, np.float32)
        return out

    def _scaled(self, latents: np.ndarray) -> np.ndarray:
        """Cached latents (the VAE's) as the model sees them."""
        shift = float((self.autoencoder or {}).get("shift_factor", 0.0))
        return (latents.astype(np.float32) - np.float32(shift)) * np.float32(self.latent_scale)

    def null(self) -> dict[str, np.ndarray] | None:
        if self.kind == "class":
            return None
        from jdit.weights.safetensors_io import read_safetensors

        try:
            t = read_safetensors(self.null_path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.null_path}: the encoded empty prompt (tensors 'text' (1, L, D) and "
                "'text_mask' (1, L)) is needed for condition dropout; set data.null_caption"
            ) from None
        text, mask = np.asarray(t.get("text")), np.asarray(t.get("text_mask"))
        want = self.cache.shape(0, "text")
        if text.shape != (1, *want) or mask.shape != (1, want[0]):
            raise ValueError(f"{self.null_path}: expected text (1, {want[0]}, {want[1]}) and "
                             f"text_mask (1, {want[0]}), got {text.shape} and {mask.shape}")
        return {"context": text.astype(np.float32), "context_mask": mask.astype(np.int32)}

    def _text_encoder(self) -> Any:
        from jdit.pipelines.encoders import WordTextEncoder

        identity = self.meta.get("text_encoder") or {}
        if identity.get("kind") == "words":
            return WordTextEncoder.from_identity(identity)
        return None

    def encode(self, captions: list[str]) -> dict[str, np.ndarray]:
        encoder = self._text_encoder()
        if encoder is None:
            raise ValueError(f"{self.path}: prompts other than the cached preview ones need the "
                             "cache's text encoder; only a words: encoder is rebuilt in training")
        ctx, mask = encoder.encode(captions)
        return {"context": ctx, "context_mask": mask}

    def preview(self) -> tuple[list[str], dict[str, np.ndarray]] | None:
        """The cache's preview captions (``preview.safetensors``, written by ``jdit cache``) or,
        for class data, its first labels; None for a cache without them."""
        if self.autoencoder is None:
            return None  # a hand-written cache: no decoder known
        if self.kind == "class":
            labels = np.unique([int(self.cache[i]["label"]) for i in range(min(len(self.cache),
                                                                               64))])[:16]
            return [str(k) for k in labels], {"labels": labels.astype(np.int32)}
        from jdit.data.caching import PREVIEW, read_preview

        if not (self.path / PREVIEW).is_file():
            return None
        prompts, ctx, mask = read_preview(self.path / PREVIEW)
        cond = {"context": ctx, "context_mask": mask}
        if self.condition is None:
            return prompts, cond
        # a control run previews each caption with its example's condition, in the commonest
        # bucket (the grid's size); captions of other buckets are left out
        first: dict[str, int] = {}
        for i in range(len(self.cache)):
            first.setdefault(self.cache._strings["caption"][i], i)
        rows = [j for j, p in enumerate(prompts) if p in first and
                tuple(self.cache.shape(first[p], "latent")[:2]) == self.sample_hw]
        if not rows:
            return None
        cond = {k: v[rows] for k, v in cond.items()}
        cond["condition"] = self._scaled(np.stack([self.cache[first[prompts[j]]]["condition"]
                                                   for j in rows]))
        return [f"[{self.condition}] {prompts[j]}" for j in rows], cond

    def to_images(self, samples: np.ndarray) -> np.ndarray:
        """Sampled latents (as the model sees them) -> images in [-1, 1], with the cache's VAE."""
        ae = self.autoencoder or {"kind": "identity"}
        if ae["kind"] == "identity":
            return np.clip(samples, -1.0, 1.0)
        if self._decoder is None:
            from jdit.pipelines.encoders import VaeEncoder

            self._decoder = VaeEncoder.from_pretrained(ae["source"])
            if self._decoder.identity["config_sha256"] != ae.get("config_sha256"):
                raise ValueError(f"{ae['source']}: this VAE's config differs from the one the "
                                 f"cache {self.path} was encoded with")
        z = samples / np.float32(self.latent_scale) + np.float32(ae.get("shift_factor", 0.0))
        return np.clip(self._decoder.decode(z), -1.0, 1.0)

    def evaluate(self, generate: Generate, **kwargs: Any) -> dict[str, float]:
        text = self.meta.get("text_encoder") or {}
        if text.get("source") == "words:shapes" and (self.autoencoder or {}).get("kind") == \
                "identity":
            return shapes_adherence(generate, self.encode, **kwargs)
        raise ValueError("this feature cache has no built-in evaluation (only a pixel-space "
                         "cache of the embedded shapes data does); evaluate decoded images with "
                         "your own metrics")


TASKS = {"shapes": ShapesTask, "digits": DigitsTask, "feature_cache": FeatureCacheTask}


def make_task(cfg: Mapping[str, Any], batch_size: int, seed: int
              ) -> ShapesTask | DigitsTask | FeatureCacheTask:
    name = cfg.get("name")
    if name not in TASKS:
        raise ValueError(f"data.name must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](cfg, batch_size, seed)
