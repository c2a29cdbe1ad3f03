"""The encoders ``jdit cache`` runs once per example: an image encoder and a text encoder.

Image encoders map a batch of images (B, H, W, 3) in [-1, 1] to unscaled latents (the VAE's
posterior mean, as the pipelines decode ``latents / scaling_factor``); text encoders map captions
to ``(features (B, L, D) float32, mask (B, L) int32)`` exactly as the text-to-image pipelines
encode prompts. Each has an ``identity``: a JSON dict recorded in the cache's metadata, so that
training can refuse a cache made for another model and rebuild the text encoder for sampling.

    image = image_encoder("identity")                 # pixel-space models
    image = image_encoder("runs/pipeline/vae", tile=64) # any jdit.autoencoders.from_pretrained folder
    text = text_encoder("words:shapes")                # the embedded shapes vocabulary
    text = text_encoder("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")  # a pipeline's T5 + tokenizer
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np


def _fingerprint(config_file: Path) -> str:
    """sha256 of a component's config (canonical JSON): tells the SD VAE from the SDXL VAE,
    T5-XXL from T5-base, whatever the folder is called."""
    cfg = json.loads(config_file.read_text(encoding="utf-8"))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}  # _name_or_path, versions
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


class PixelIdentity:
    """No autoencoder: the model trains on pixels in [-1, 1] (the embedded datasets' models)."""

    factor = 1
    identity = {"kind": "identity", "channels": 3, "factor": 1, "scaling_factor": 1.0,
                "shift_factor": 0.0}

    def encode(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(images, np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return np.asarray(latents, np.float32)


class VaeEncoder:
    """An AutoencoderKL / AutoencoderDC: the posterior mean, jitted once per image size.

    ``tile`` (pixels) encodes AutoencoderKL images in tiles with whole-image GroupNorm
    statistics (:func:`jdit.autoencoders.encode_tiled_exact`): the same latents with bounded
    activation memory, for 2K/4K images."""

    def __init__(self, module: Any, params: Any, source: str, *, fingerprint: str = "",
                 tile: int | None = None) -> None:
        import jax

        self.module, self.params, self.tile = module, params, tile
        self.factor = int(module.scale_factor)
        shift = getattr(module, "shift_factor", None)
        self.identity = {"kind": type(module).__name__, "source": source,
                         "config_sha256": fingerprint, "channels": int(module.latent_channels),
                         "factor": self.factor, "scaling_factor": float(module.scaling_factor),
                         "shift_factor": float(shift or 0.0)}
        if tile is None:
            self._encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))
        else:
            from jdit.autoencoders import encode_tiled_exact

            self._encode = jax.jit(lambda p, x: encode_tiled_exact(module, p, x, tile=tile))
        self._decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, tile: int | None = None) -> VaeEncoder:
        from jdit.autoencoders import from_pretrained

        folder = Path(path)
        if (folder / "vae").is_dir() and not (folder / "config.json").exists():
            folder = folder / "vae"
        module, params = from_pretrained(folder)
        return cls(module, params, str(path), fingerprint=_fingerprint(folder / "config.json"),
                   tile=tile)

    def encode(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._encode(self.params, np.asarray(images, np.float32)), np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Unscaled latents -> images in [-1, 1] (sample grids during training)."""
        return np.asarray(self._decode(self.params, np.asarray(latents, np.float32)), np.float32)


class WordTextEncoder:
    """:class:`jdit.text.WordEncoder` (no weights): ``words:shapes`` is the embedded shapes
    data's vocabulary; ``words:FILE`` a vocabulary file, one word per line."""

    def __init__(self, encoder: Any, source: str) -> None:
        self.encoder = encoder
        self.identity = {"kind": "words", "source": source,
                         "vocabulary": list(encoder.vocabulary), "dim": encoder.dim,
                         "max_length": encoder.max_length, "seed": encoder.seed}

    @classmethod
    def from_spec(cls, spec: str, *, dim: int = 64, max_length: int = 16) -> WordTextEncoder:
        from jdit.text import WordEncoder

        name = spec.split(":", 1)[1]
        if name == "shapes":
            from jdit.data.shapes import vocabulary

            words = vocabulary()
        else:
            try:
                words = [w for w in Path(name).read_text(encoding="utf-8").split() if w]
            except OSError as e:
                raise ValueError(f"text encoder {spec!r}: cannot read the vocabulary file "
                                 f"({e}); expected words:shapes or words:<file>") from None
        return cls(WordEncoder.from_texts(words, dim=dim, max_length=max_length), spec)

    @classmethod
    def from_identity(cls, identity: dict[str, Any]) -> WordTextEncoder:
        from jdit.text import WordEncoder

        return cls(WordEncoder(tuple(identity["vocabulary"]), int(identity["dim"]),
                               int(identity["max_length"]), int(identity["seed"])),
                   identity["source"])

    def encode(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        features, mask = self.encoder.encode(captions)
        return np.asarray(features, np.float32), np.asarray(mask, np.int32)


def _encoder_kind(module: Any) -> str:
    name = type(module).__name__
    return "gemma2" if name.startswith("Gemma") else "llama" if name.startswith("Llama") else "t5"


class PretrainedTextEncoder:
    """T5 (PixArt), Gemma-2 (SANA) or a Llama / Qwen2 decoder (LI-DiT) with its tokenizer,
    encoding captions as :class:`jdit.pipelines.TextToImage` encodes prompts: lower-cased and
    stripped, padded to ``max_length`` tokens.

    An instruction goes before each caption in one of two ways: ``instruction_style="sana"``
    (SANA's pipeline: encoded with the caption, then the first and the last ``max_length - 1``
    positions kept) or ``"drop"`` (LI-DiT's usage guidance: tokenized apart, its positions
    dropped after encoding, ``max_length`` caption tokens kept). ``hidden_layer`` (decoders):
    which hidden state is the feature (LI-DiT: -3). ``rms_norm``: each token's features divided
    by their root mean square (parameter-free; an intermediate hidden state has no final norm,
    and its scale varies by layer and model)."""

    def __init__(self, module: Any, params: Any, tokenizer: Any, max_length: int,
                 instruction: str | None, source: str, fingerprint: str = "", *,
                 instruction_style: str = "sana", rms_norm: bool = False) -> None:
        import jax

        if instruction_style not in ("sana", "drop"):
            raise ValueError(f"instruction_style must be 'sana' or 'drop', got "
                             f"{instruction_style!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.module, self.params, self.tokenizer = module, params, tokenizer
        self.max_length, self.instruction = int(max_length), instruction
        self.instruction_style = instruction_style
        kind = _encoder_kind(module)
        self.identity = {"kind": kind, "source": source, "config_sha256": fingerprint,
                         "max_length": self.max_length,
                         "instruction_sha256": None if instruction is None else
                         hashlib.sha256(instruction.encode()).hexdigest()[:16]}
        hidden_layer = getattr(module, "hidden_layer", -1)
        if hidden_layer != -1:  # only what differs from the defaults: older identities match
            self.identity["hidden_layer"] = int(hidden_layer)
        if instruction is not None and instruction_style != "sana":
            self.identity["instruction_style"] = instruction_style
        self.rms_norm = bool(rms_norm)
        self.limit: int | None = None  # the encoder's maximum length (from_pretrained reads it)
        if self.rms_norm:
            self.identity["rms_norm"] = True
        from jdit.pipelines.prompts import token_rms_norm

        def apply(p: Any, ids: Any, mask: Any) -> Any:
            out = module.apply({"params": p}, ids, mask)
            return token_rms_norm(out) if self.rms_norm else out

        self._apply = jax.jit(apply)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, max_length: int | None = None,
                        instruction: str | None | bool = True, hidden_layer: int | None = None,
                        instruction_style: str | None = None, rms_norm: bool = False
                        ) -> PretrainedTextEncoder:
        """A pipeline folder (or hub id) with ``text_encoder/`` and ``tokenizer/``, or a text
        encoder folder with its tokenizer files beside the weights (a transformers Llama /
        Qwen2 causal-LM folder with its ``tokenizer.json`` works). The pipeline's class gives
        the default ``max_length`` (120 PixArt-α, 300 PixArt-Σ, SANA and decoders) and, for
        SANA, the instruction (``instruction=False`` drops it, a string replaces it) and its
        style ("sana"; "drop" for any other instruction)."""
        from jdit import text
        from jdit.pipelines import hub
        from jdit.pipelines.text_to_image import PIPELINE_CLASSES

        folder = Path(path)
        if not folder.exists():
            folder = hub.resolve(str(path), None)
        spec: dict[str, Any] = {}
        if (folder / "model_index.json").is_file():
            spec = PIPELINE_CLASSES.get(hub.model_index(folder)["_class_name"], {})
            if "template" in spec:  # its negative prompt is encoded without the template
                raise ValueError(f"{path}: caching a {hub.model_index(folder)['_class_name']}'s "
                                 f"prompt features (a system-prompt template) is not supported")
        encoder_dir = folder / "text_encoder" if (folder / "text_encoder").is_dir() else folder
        tokenizer_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else encoder_dir
        module, params = text.from_pretrained(encoder_dir, hidden_layer=hidden_layer)
        kind = _encoder_kind(module)
        tokenizer_cls = text.T5Tokenizer if kind == "t5" else text.JsonTokenizer
        tokenizer = tokenizer_cls.from_pretrained(tokenizer_dir)
        if max_length is None:
            max_length = int(spec.get("max_sequence_length", 120 if kind == "t5" else 300))
        from_spec = instruction is True
        if instruction is True:
            instruction = spec.get("instruction")
        elif instruction is False:
            instruction = None
        if instruction_style is None:
            instruction_style = "sana" if from_spec and kind == "gemma2" else "drop"
        if instruction is not None and instruction_style == "drop" and kind == "t5":
            raise ValueError(f"{path}: an instruction is for decoder encoders (Gemma-2, Llama, "
                             f"Qwen2), not T5")
        from jdit.pipelines.prompts import max_positions

        out = cls(module, params, tokenizer, max_length, instruction, str(path),
                  _fingerprint(encoder_dir / "config.json"), instruction_style=instruction_style,
                  rms_norm=rms_norm)
        out.limit = max_positions(encoder_dir)
        return out

    @functools.cached_property
    def width(self) -> int:
        """The features' width (the model's ``caption_channels``, or a refiner encoder's)."""
        return int(self.encode([""])[0].shape[-1])

    def encode(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        texts = [c.lower().strip() for c in captions]
        if self.instruction is not None and self.instruction_style == "drop":
            tokens, n = self.tokenizer.with_instruction(texts, self.instruction, self.max_length,
                                                        limit=self.limit)
            ids = np.asarray(tokens["input_ids"], np.int32)
            mask = np.asarray(tokens["attention_mask"], np.int32)
            features = np.asarray(self._apply(self.params, ids, mask), np.float32)
            return features[:, n:], mask[:, n:]
        length = self.max_length
        if self.instruction is not None:
            texts = [self.instruction + t for t in texts]
            length = len(self.tokenizer.encode(self.instruction)) + self.max_length - 2
        tokens = self.tokenizer(texts, max_length=length)
        ids = np.asarray(tokens["input_ids"], np.int32)
        mask = np.asarray(tokens["attention_mask"], np.int32)
        features = np.asarray(self._apply(self.params, ids, mask), np.float32)
        if self.instruction is not None:  # the first and the last max_length - 1 positions
            keep = [0, *range(ids.shape[1] - self.max_length + 1, ids.shape[1])]
            features, mask = features[:, keep], mask[:, keep]
        return features, mask


class MultiTextEncoder:
    """Several prompt encoders (LI-DiT's collaborative setting): each encodes every caption,
    and their features are packed as a model with a ``text_refiner`` takes them
    (:func:`jdit.nn.pack_contexts`: along the sequence, widths zero-padded to the widest)."""

    def __init__(self, encoders: list[PretrainedTextEncoder]) -> None:
        if len(encoders) < 2:
            raise ValueError("MultiTextEncoder needs at least two encoders")
        self.encoders = encoders
        self.identity = {"kind": "multi", "encoders": [e.identity for e in encoders]}

    @property
    def layout(self) -> list[tuple[int, int]]:
        """``(width, tokens)`` of each encoder: the ``text_refiner.encoders`` it needs."""
        return [(e.width, e.max_length) for e in self.encoders]

    @property
    def width(self) -> int:
        return max(w for w, _ in self.layout)

    def encode(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [e.encode(captions) for e in self.encoders]
        width = max(f.shape[-1] for f, _ in parts)
        features = np.concatenate(
            [np.pad(f, ((0, 0), (0, 0), (0, width - f.shape[-1]))) for f, _ in parts], axis=1)
        return features, np.concatenate([m for _, m in parts], axis=1)


def text_encoders(specs: list[dict[str, Any]]) -> PretrainedTextEncoder | MultiTextEncoder:
    """One encoder, or several packed, from dicts with ``path`` and optionally ``max_length``,
    ``hidden_layer``, ``instruction``, ``instruction_style`` and ``rms_norm`` (a config's
    ``data.text_encoders``)."""
    keys = {"path", "max_length", "hidden_layer", "instruction", "instruction_style", "rms_norm"}
    built = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        unknown = sorted(set(spec) - keys)
        if unknown or "path" not in spec:
            raise ValueError(f"text encoder {i}: expected a dict with 'path' and optionally "
                             f"{sorted(keys - {'path'})}, got keys {sorted(spec)}")
        built.append(PretrainedTextEncoder.from_pretrained(
            spec.pop("path"), instruction=spec.pop("instruction", False) or False, **spec))
    if not built:
        raise ValueError("no text encoders given")
    return built[0] if len(built) == 1 else MultiTextEncoder(built)


def image_encoder(spec: str, *, tile: int | None = None) -> PixelIdentity | VaeEncoder:
    """``"identity"`` (pixel space), or a VAE folder / pipeline folder / hub id."""
    if spec == "identity":
        if tile is not None:
            raise ValueError("tiled encoding needs a VAE; the identity encoder has none")
        return PixelIdentity()
    path = Path(spec)
    if not path.exists():
        from jdit.pipelines import hub

        path = hub.resolve(spec, None)
    return VaeEncoder.from_pretrained(path, tile=tile)


def text_encoder(spec: str, *, max_length: int | None = None, dim: int = 64,
                 instruction: str | None | bool = True, hidden_layer: int | None = None
                 ) -> Any:
    """``"words:shapes"`` / ``"words:FILE"``, or a T5 / Gemma-2 / Llama / Qwen2 folder,
    pipeline folder or hub id (an instruction string: LI-DiT's, dropped after encoding)."""
    if spec.startswith("words:"):
        if hidden_layer is not None or isinstance(instruction, str):
            raise ValueError("a words: encoder takes no hidden layer or instruction")
        return WordTextEncoder.from_spec(spec, dim=dim, max_length=max_length or 16)
    return PretrainedTextEncoder.from_pretrained(spec, max_length=max_length,
                                                 instruction=instruction,
                                                 hidden_layer=hidden_layer)
