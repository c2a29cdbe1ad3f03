"""``jdit bench cache``: images per second of ``jdit cache``, against its encoders alone.

A folder of JPEG photo-like images of mixed sizes in three aspect ratios (smooth random colour
fields, 1.0-1.5x the bucket's pixels, so every image is decoded and resized), captions of
8-20 words; a random SD-shaped VAE (widths scaled down) and a random T5 encoder (a real
sentencepiece tokenizer), both jitted as ``jdit cache`` runs them. Measured in one run:

* ``encoders``: the encoders alone on the very batches the cache encodes (pixels prepared
  beforehand): the ceiling;
* ``prepare``: decoding, resizing and cropping every image on one thread (what the worker
  threads overlap with encoding);
* ``cache``: :func:`jdit.data.caching.build_cache` end to end (reading, decoding and resizing in
  ``threads`` background threads, encoding, writing shards), into a fresh folder each time.

The bar (issue 18): ``cache`` images/s >= 0.8x ``encoders`` images/s (medians).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _photos(folder: Path, n: int, bucket_table: int, seed: int = 0) -> None:
    """JPEG images of smooth random colour fields with captions, in three buckets (as photos
    mostly are: square, 4:3 and 3:4)."""
    from PIL import Image

    from jdit.data.buckets import table_for

    rng = np.random.default_rng(seed)
    words = ("red green blue small large wooden glass tree river house mountain cat dog sky "
             "field road city window light shadow morning evening cloud stone flower").split()
    table = table_for(bucket_table)
    sizes = [table[k] for k in ("1.0", "0.78", "1.29")]  # square, 4:3 landscape and portrait
    folder.mkdir(parents=True)
    for i in range(n):
        bh, bw = sizes[i % len(sizes)]
        scale = rng.uniform(1.0, 1.5)
        h, w = int(bh * scale), int(bw * scale)
        coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        image.save(folder / f"{i:05d}.jpg", quality=90)
        caption = " ".join(rng.choice(words, rng.integers(8, 21)))
        (folder / f"{i:05d}.txt").write_text(caption)


def _encoders(workdir: Path, widths: tuple[int, ...], t5_width: int, max_length: int
              ) -> tuple[Any, Any]:
    import jax

    from jdit.autoencoders import AutoencoderKL
    from jdit.nn.init import init_params, perturbed
    from jdit.pipelines.encoders import PretrainedTextEncoder, VaeEncoder
    from jdit.testing.tiny_pipelines import train_tokenizer
    from jdit.text import T5Encoder, T5Tokenizer

    vae = AutoencoderKL(block_out_channels=widths, layers_per_block=2,
                        norm_num_groups=min(32, widths[0]), latent_channels=4)
    vae_params = perturbed(init_params(vae, jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    image = VaeEncoder(vae, vae_params, "random")
    train_tokenizer(workdir / "tokenizer", vocab_size=256)
    tokenizer = T5Tokenizer.from_pretrained(workdir / "tokenizer")
    t5 = T5Encoder(vocab_size=256, d_model=t5_width, d_kv=t5_width // 8, d_ff=2 * t5_width,
                   num_layers=4, num_heads=8, feed_forward_proj="gated-gelu")
    ids = np.zeros((1, max_length), np.int32)
    t5_params = init_params(t5, jax.random.PRNGKey(2),
                            {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    text = PretrainedTextEncoder(t5, t5_params, tokenizer, max_length, None, "random")
    return image, text


def run(images: int = 96, table: int = 256, batch_size: int = 8, threads: int = 2,
        widths: tuple[int, ...] = (32, 64, 128, 128), t5_width: int = 256,
        max_length: int = 120, repeats: int = 3,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    from jdit.data.caching import Geometry, Skip, _prepare, build_cache
    from jdit.data.sources import open_source

    log = log or (lambda s: print(s, file=sys.stderr))
    work = Path(tempfile.mkdtemp(prefix="jdit-bench-cache-"))
    try:
        _photos(work / "photos", images, table)
        source = open_source(str(work / "photos"))
        image, text = _encoders(work, tuple(widths), t5_width, max_length)
        geometry = Geometry(table=table)

        # the batches the cache will encode: every image prepared once, grouped by bucket
        t0 = time.perf_counter()
        prepared = []
        for i in range(len(source)):
            try:
                prepared.append(_prepare(source, i, source.example_id(i), "text", geometry))
            except Skip as e:
                raise RuntimeError(f"benchmark image {i} was skipped: {e}") from None
        prepare_s = time.perf_counter() - t0
        groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for e in prepared:
            groups.setdefault(e["pixels"].shape[:2], []).append(e)
        batches = []
        for members in groups.values():
            for s in range(0, len(members), batch_size):
                chunk = members[s: s + batch_size]
                pixels = np.stack([e["pixels"] for e in chunk])
                pad = batch_size - len(chunk)
                if pad:
                    pixels = np.concatenate([pixels, np.zeros((pad, *pixels.shape[1:]),
                                                              np.float32)])
                batches.append((pixels, [e["caption"] for e in chunk] + [""] * pad))

        def encoders_alone() -> float:
            t = time.perf_counter()
            for pixels, captions in batches:
                image.encode(pixels)
                text.encode(captions)
            return time.perf_counter() - t

        def cache_run(k: int) -> float:
            t = time.perf_counter()
            build_cache(source, work / f"cache{k}", image, text, geometry=geometry,
                        batch_size=batch_size, threads=threads, progress=False)
            return time.perf_counter() - t

        log(f"compiling {len(groups)} bucket shapes ...")
        encoders_alone()  # compiles every bucket's shape
        enc, end = [], []
        for k in range(repeats):  # alternating, medians
            enc.append(encoders_alone())
            end.append(cache_run(k))
            shutil.rmtree(work / f"cache{k}")
            log(f"round {k}: encoders {images / enc[-1]:.1f} images/s, cache "
                f"{images / end[-1]:.1f} images/s")
        enc_rate, end_rate = images / statistics.median(enc), images / statistics.median(end)
        return {"images": images, "buckets": len(groups), "batch_size": batch_size,
                "threads": threads, "table": table, "vae_widths": list(widths),
                "t5_width": t5_width, "max_length": max_length,
                "encoders_images_per_s": round(enc_rate, 2),
                "cache_images_per_s": round(end_rate, 2),
                "prepare_images_per_s_one_thread": round(images / prepare_s, 2),
                "prepare_fraction_of_cache_time": round(prepare_s / statistics.median(end), 3),
                "cache_over_encoders": round(end_rate / enc_rate, 3),
                "bar_0_8_met": end_rate / enc_rate >= 0.8}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--table", type=int, default=256, help="bucket table (resolution)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="decode/resize threads")
    parser.add_argument("--repeats", type=int, default=3)


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    emit(run(images=args.images, table=args.table, batch_size=args.batch_size,
             threads=args.threads, repeats=args.repeats))
    return 0
