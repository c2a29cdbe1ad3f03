"""Tasks: what a run trains on, how it conditions the model, and how it is evaluated.

A task gives deterministic batches by index (so a resumed run sees exactly the batches it would
have seen), the null condition for classifier-free guidance, conditions for sampling, and an
``evaluate`` that generates with a ``generate(conditions, key) -> images`` function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jdit.text import WordEncoder

Generate = Callable[[dict[str, np.ndarray], int], np.ndarray]
TASKS = ("shapes", "digits")


class ShapesTask:
    """Captioned coloured shapes, a word-level text encoder, prompt-adherence evaluation."""

    kind = "text"

    def __init__(self, cfg: Mapping[str, Any], batch_size: int, seed: int) -> None:
        from jdit.data import shapes

        self.shapes = shapes
        self.size = int(cfg.get("size", 32))
        self.pair_fraction = float(cfg.get("pair_fraction", 0.5))
        self.batch_size, self.seed = batch_size, seed
        # Every word of the vocabulary (colours, shapes, positions, "a"/"an", "and"); words are
        # not held out, only their combinations.
        vocab = [shapes.caption(p) for split in ("train", "heldout")
                 for p in shapes.prompts("single", split)] + ["and"]
        self.encoder = WordEncoder.from_texts(vocab, dim=int(cfg.get("text_dim", 64)),
                                              max_length=int(cfg.get("max_length", 16)))
        self.channels = 3

    def encode(self, captions: list[str]) -> dict[str, np.ndarray]:
        ctx, mask = self.encoder.encode(captions)
        return {"context": ctx, "context_mask": mask}

    def batch(self, index: int) -> dict[str, np.ndarray]:
        b = self.shapes.batch(self.seed, index, self.batch_size, size=self.size,
                              pair_fraction=self.pair_fraction)
        return {"images": b["images"], **self.encode(list(b["captions"]))}

    def null(self) -> dict[str, np.ndarray]:
        return self.encode([""])

    def preview(self) -> tuple[list[str], dict[str, np.ndarray]]:
        prompts = ([self.shapes.caption(p) for p in self.shapes.prompts("single", "heldout")[:8]]
                   + [self.shapes.caption(p) for p in self.shapes.prompts("pair", "heldout")[:8]])
        return prompts, self.encode(prompts)

    def evaluate(self, generate: Generate, batch_size: int = 64, num_pairs: int = 200,
                 single_repeats: int = 4) -> dict[str, float]:
        """adherence_single: every held-out single prompt ``single_repeats`` times (216 images
        at the defaults); adherence_pair: ``num_pairs`` distinct held-out pair prompts."""
        singles = self.shapes.prompts("single", "heldout") * single_repeats
        pairs = self.shapes.prompts("pair", "heldout")[:num_pairs]
        out: dict[str, float] = {}
        for name, objs in (("adherence_single", singles), ("adherence_pair", pairs)):
            images = []
            for start in range(0, len(objs), batch_size):
                chunk = objs[start: start + batch_size]
                cond = self.encode([self.shapes.caption(o) for o in chunk])
                images.append(generate(cond, start))
            out[name] = float(self.shapes.adherence(np.concatenate(images), list(objs)))
            out[f"num_{name.split('_')[1]}_prompts"] = len(objs)
        return out


class DigitsTask:
    """scikit-learn's handwritten digits, class-conditional; classifier-based evaluation."""

    kind = "class"

    def __init__(self, cfg: Mapping[str, Any], batch_size: int, seed: int) -> None:
        from jdit.data import digits

        self.digits = digits
        self.size = int(cfg.get("size", 32))
        self.batch_size, self.seed = batch_size, seed
        self.channels = 1

    def batch(self, index: int) -> dict[str, np.ndarray]:
        b = self.digits.batch(self.seed, index, self.batch_size, size=self.size)
        return {"images": b["images"], "labels": np.asarray(b["labels"], np.int32)}

    def null(self) -> None:
        return None

    def preview(self) -> tuple[list[str], dict[str, np.ndarray]]:
        labels = np.tile(np.arange(10, dtype=np.int32), 2)
        return [str(k) for k in labels], {"labels": labels}

    def evaluate(self, generate: Generate, batch_size: int = 100, per_class: int = 50
                 ) -> dict[str, float]:
        from jdit.eval import digits as digits_eval

        labels = np.repeat(np.arange(10, dtype=np.int32), per_class)
        images = np.concatenate([generate({"labels": labels[s: s + batch_size]}, s)
                                 for s in range(0, len(labels), batch_size)])
        return {k: float(v) for k, v in digits_eval.evaluate(images, labels).items()}


def make_task(cfg: Mapping[str, Any], batch_size: int, seed: int) -> ShapesTask | DigitsTask:
    name = cfg.get("name")
    if name == "shapes":
        return ShapesTask(cfg, batch_size, seed)
    if name == "digits":
        return DigitsTask(cfg, batch_size, seed)
    raise ValueError(f"data.name must be one of {TASKS}, got {name!r}")
