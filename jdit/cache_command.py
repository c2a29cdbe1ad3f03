"""The ``jdit cache`` command: arguments, encoders and source from them, then
:func:`jdit.data.caching.build_cache`.

    jdit cache photos/ cache/ --pretrained PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --buckets 1024
    jdit cache data.jsonl cache/ --vae sdxl-vae/ --text-encoder t5/ --max-length 300 --buckets 512
    jdit cache tfds:imagenet2012/train cache/ --vae vae/ --labels --size 256
    jdit cache shapes_png/ cache/ --vae identity --text-encoder words:shapes --size 32
    jdit cache photos/ cache/ --pretrained PixArt-alpha/PixArt-Sigma-XL-2-512-MS --buckets 512 \
        --condition canny            # or --condition depth_maps/: control training data
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from jdit.data.buckets import TABLES
from jdit.data.caching import DTYPES, NULL_CAPTION, Geometry, build_cache
from jdit.data.loader import RESAMPLE


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 256 or 512x768 (height x width), "
                                         f"got {text!r}")
    return h, w


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="an image folder (captions in NAME.txt or NAME.json), a "
                                       "JSONL manifest, WebDataset .tar shards, or tfds:NAME/SPLIT")
    parser.add_argument("out", help="the cache folder (resumed when it holds an unfinished cache)")
    enc = parser.add_argument_group("encoders")
    enc.add_argument("--pretrained", default=None,
                     help="a diffusers pipeline folder or hub id: its VAE and text encoder")
    enc.add_argument("--vae", default=None, help="a VAE folder, or 'identity' (pixel space)")
    enc.add_argument("--text-encoder", action="append", default=None,
                     help="a T5 / Gemma-2 / Llama / Qwen2 folder (tokenizer beside it), or "
                          "words:shapes; repeat it for several LLM encoders, whose features are "
                          "stored packed (a model's text_refiner splits them)")
    enc.add_argument("--hidden-layer", type=int, default=None,
                     help="decoder encoders: which hidden state is the feature (LI-DiT: -3)")
    enc.add_argument("--instruction", default=None,
                     help="decoder encoders: LI-DiT's instruction before each caption, "
                          "tokenized apart and dropped after encoding")
    enc.add_argument("--labels", action="store_true",
                     help="class-labelled data (a label per image instead of a caption)")
    enc.add_argument("--max-length", type=_positive(int), default=None,
                     help="text tokens (default: the pipeline's, 120 PixArt-α, 300 Σ/SANA)")
    enc.add_argument("--text-dim", type=_positive(int), default=64,
                     help="feature width of a words: encoder")
    enc.add_argument("--no-instruction", action="store_true",
                     help="SANA: encode captions without its instruction prefix")
    enc.add_argument("--tile", type=_positive(int), default=None,
                     help="encode with exact tiles of this many pixels (2K/4K images)")
    ctl = parser.add_argument_group("control conditions (for control.method training)")
    ctl.add_argument("--condition", default=None, metavar="canny|FOLDER",
                     help="also store each image's condition, encoded by the same VAE: 'canny' "
                          "(the edges of the resized image) or a folder of condition images "
                          "named like the images (same relative path, any image extension)")
    ctl.add_argument("--canny", nargs=2, type=float, default=(100.0, 200.0),
                     metavar=("LOW", "HIGH"), help="--condition canny: the thresholds")
    geo = parser.add_argument_group("image sizes")
    geo.add_argument("--buckets", type=int, choices=sorted(TABLES), default=None,
                     help="aspect-ratio buckets of this base resolution (PixArt / SANA tables)")
    geo.add_argument("--size", type=_size, default=None, help="one fixed size: 256 or HxW")
    geo.add_argument("--resample", choices=RESAMPLE, default=None,
                     help="default bicubic; lanczos for the 2K/4K tables, as PixArt-Σ")
    geo.add_argument("--max-aspect-ratio", type=float, default=4.5)
    geo.add_argument("--max-upscale", type=float, default=2.0,
                     help="skip images that would be enlarged more than this")
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=_positive(int), default=8)
    run.add_argument("--dtype", choices=DTYPES, default="float16",
                     help="stored latents and text features (pixels stay float32)")
    run.add_argument("--examples-per-shard", type=_positive(int), default=256,
                     help="examples per shard file (a killed run redoes at most one shard)")
    run.add_argument("--threads", type=_positive(int), default=4,
                     help="threads decoding and resizing images")
    run.add_argument("--caption-feature", default=None, help="tfds: the caption feature")
    run.add_argument("--data-dir", default=None, help="tfds: the data_dir")
    run.add_argument("--overwrite", action="store_true",
                     help="rebuild a cache that exists (only a jdit cache is ever removed)")
    run.add_argument("--wait-timeout", type=float, default=None,
                     help="process 0: seconds to wait for the other processes' parts")
    run.add_argument("--no-progress", action="store_true")


def is_cache_folder(path: Path) -> bool:
    """A folder ``jdit cache`` wrote (complete or not)."""
    from jdit.data.cache import FORMAT

    index = path / "index.json"
    if index.is_file() and FORMAT in index.read_text(encoding="utf-8", errors="replace")[:200]:
        return True
    return (path / NULL_CAPTION).is_file() or any(path.glob("part-*-of-*/shard-*.json")) or \
        any(path.glob("part-*-of-*/index.json"))


def _encoders(args: argparse.Namespace) -> tuple[Any, Any]:
    from jdit.pipelines.encoders import image_encoder, text_encoder

    vae = args.vae or args.pretrained
    if vae is None:
        raise ValueError("name the image encoder: --pretrained PIPELINE, or --vae FOLDER "
                         "(or --vae identity for pixel-space models)")
    image = image_encoder(vae, tile=args.tile)
    if args.labels:
        if args.text_encoder:
            raise ValueError("--labels takes no text encoder")
        return image, None
    specs = args.text_encoder or ([args.pretrained] if args.pretrained else [])
    if not specs:
        raise ValueError("name the text encoder: --pretrained PIPELINE or --text-encoder "
                         "(or --labels for class-labelled data)")
    if args.instruction is not None and args.no_instruction:
        raise ValueError("--instruction and --no-instruction contradict each other")
    instruction: str | bool = False if args.no_instruction else True
    if args.instruction is not None:
        instruction = args.instruction
    kwargs = dict(max_length=args.max_length, dim=args.text_dim, instruction=instruction,
                  hidden_layer=args.hidden_layer)
    if len(specs) == 1:
        return image, text_encoder(specs[0], **kwargs)
    if any(s.startswith("words:") for s in specs):
        raise ValueError("several --text-encoder are LLM / T5 folders, not words: encoders")
    from jdit.pipelines.encoders import MultiTextEncoder

    return image, MultiTextEncoder([text_encoder(s, **kwargs) for s in specs])


def _source_name(spec: str) -> str:
    """The source as recorded (and compared on resume): local paths made absolute."""
    path = Path(spec)
    return str(path.resolve()) if "://" not in spec and path.exists() else spec


def main(args: argparse.Namespace) -> int:
    import jax

    from jdit.data.sources import open_source
    from jdit.files import DirectoryLock, check_replaceable

    out = Path(args.out)
    if (args.buckets is None) == (args.size is None):
        raise ValueError("give one of --buckets RESOLUTION (aspect-ratio buckets) and --size "
                         "HxW (one fixed size)")
    check_replaceable(out, ours=is_cache_folder, what="a jdit feature cache")
    index, count = jax.process_index(), jax.process_count()
    if args.overwrite and out.exists():
        if count > 1:  # another process may already be writing its part
            raise ValueError("--overwrite with several processes: remove the old cache first")
        shutil.rmtree(out)
    resample = args.resample or ("lanczos" if (args.buckets or 0) >= 2048 else "bicubic")
    geometry = Geometry(table=args.buckets, size=args.size, resample=resample,
                        max_aspect_ratio=args.max_aspect_ratio, max_upscale=args.max_upscale)
    folder = Path(args.source)
    extra = {"missing_sidecar": "skip"} if folder.is_dir() and not any(folder.glob("*.tar")) \
        else {}  # an image without its caption is skipped and counted, not an error
    source = open_source(args.source, label=args.labels, data_dir=args.data_dir,
                         caption_feature=args.caption_feature, **extra)
    condition = None
    if args.condition is not None:
        from jdit.data.caching import ConditionSpec

        condition = ConditionSpec.parse(args.condition, canny=tuple(args.canny))
    image, text = _encoders(args)
    factor = image.factor
    if args.size is not None and (args.size[0] % factor or args.size[1] % factor):
        raise ValueError(f"--size {args.size[0]}x{args.size[1]} is not a multiple of the "
                         f"autoencoder's factor {factor}")
    out.mkdir(parents=True, exist_ok=True)
    from jdit.data.caching import part_name

    part = out / part_name(index, count)
    part.mkdir(exist_ok=True)

    def say(message: str) -> None:
        print(f"jdit cache: {message}", file=sys.stderr)

    with DirectoryLock(part, what="cache part"):
        build_cache(source, out, image, text, geometry=geometry,
                    metadata={"source": _source_name(args.source)}, batch_size=args.batch_size,
                    dtype=args.dtype, threads=args.threads, process_index=index,
                    examples_per_shard=args.examples_per_shard,
                    process_count=count, wait_timeout=args.wait_timeout,
                    progress=not args.no_progress, log=say, condition=condition)
    if index == 0:
        from jdit.data.caching import summary_of

        totals = summary_of(out)
        print(f"{out}: {totals['examples']} examples, {totals['skipped']} skipped "
              f"{totals['skipped_by_reason'] or ''}".rstrip() + f" (see {out / 'skipped.jsonl'})")
    return 0
