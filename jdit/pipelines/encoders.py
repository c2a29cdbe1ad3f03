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


class PretrainedTextEncoder:
    """T5 (PixArt) or Gemma-2 (SANA) with its tokenizer, encoding captions as
    :class:`jdit.pipelines.TextToImage` encodes prompts: lower-cased and stripped, padded to
    ``max_length`` tokens; with SANA's instruction prefixed, the first and the last
    ``max_length - 1`` positions kept."""

    def __init__(self, module: Any, params: Any, tokenizer: Any, max_length: int,
                 instruction: str | None, source: str, fingerprint: str = "") -> None:
        import jax

        self.module, self.params, self.tokenizer = module, params, tokenizer
        self.max_length, self.instruction = int(max_length), instruction
        kind = "gemma2" if type(module).__name__.startswith("Gemma") else "t5"
        self.identity = {"kind": kind, "source": source, "config_sha256": fingerprint,
                         "max_length": self.max_length,
                         "instruction_sha256": None if instruction is None else
                         hashlib.sha256(instruction.encode()).hexdigest()[:16]}
        self._apply = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, max_length: int | None = None,
                        instruction: str | None | bool = True) -> PretrainedTextEncoder:
        """A pipeline folder (or hub id) with ``text_encoder/`` and ``tokenizer/``, or a text
        encoder folder with its tokenizer files beside the weights. The pipeline's class gives
        the default ``max_length`` (120 PixArt-α, 300 PixArt-Σ and SANA) and, for SANA, the
        instruction (``instruction=False`` drops it, a string replaces it)."""
        from jdit import text
        from jdit.pipelines import hub
        from jdit.pipelines.text_to_image import PIPELINE_CLASSES

        folder = Path(path)
        if not folder.exists():
            folder = hub.resolve(str(path), None)
        spec: dict[str, Any] = {}
        if (folder / "model_index.json").is_file():
            spec = PIPELINE_CLASSES.get(hub.model_index(folder)["_class_name"], {})
        encoder_dir = folder / "text_encoder" if (folder / "text_encoder").is_dir() else folder
        tokenizer_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else encoder_dir
        module, params = text.from_pretrained(encoder_dir)
        kind = "gemma2" if type(module).__name__.startswith("Gemma") else "t5"
        tokenizer_cls = text.GemmaTokenizer if kind == "gemma2" else text.T5Tokenizer
        tokenizer = tokenizer_cls.from_pretrained(tokenizer_dir)
        if max_length is None:
            max_length = int(spec.get("max_sequence_length", 300 if kind == "gemma2" else 120))
        if instruction is True:
            instruction = spec.get("instruction")
        elif instruction is False:
            instruction = None
        return cls(module, params, tokenizer, max_length, instruction, str(path),
                   _fingerprint(encoder_dir / "config.json"))

    def encode(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        texts = [c.lower().strip() for c in captions]
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
                 instruction: str | None | bool = True
                 ) -> WordTextEncoder | PretrainedTextEncoder:
    """``"words:shapes"`` / ``"words:FILE"``, or a T5 / Gemma-2 folder, pipeline folder or
    hub id."""
    if spec.startswith("words:"):
        return WordTextEncoder.from_spec(spec, dim=dim, max_length=max_length or 16)
    return PretrainedTextEncoder.from_pretrained(spec, max_length=max_length,
                                                 instruction=instruction)
