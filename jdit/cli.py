"""The ``jdit`` command line: ``train``, ``cache``, ``export``, ``sample``, ``eval``, ``convert``,
``aot``, ``bench``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jdit.config import parse_value


def _overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"jdit: --set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 is refused, never read as "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def cmd_convert(args: argparse.Namespace) -> int:
    import jax

    import jdit
    from jdit.weights.jdit_folder import check_destination

    if args.lora:
        return _convert_lora(args)
    if args.to == "diffusers":
        return _convert_to_diffusers(args)
    overrides = _overrides(args.set)
    check_destination(args.dst, args.overwrite)  # before minutes of reading the source
    print(f"reading {args.src} ...", file=sys.stderr)
    module, params = jdit.models.from_pretrained(args.src, state_dict_key=args.state_dict_key,
                                                 **overrides)
    jdit.models.save_pretrained(module, params, args.dst, overwrite=args.overwrite)
    arch = jdit.models.architecture(module)
    count = sum(int(p.size) for p in jax.tree.leaves(params))
    print(json.dumps({"dst": str(args.dst), "parameters": count, "model": arch}, indent=2))
    return 0


def _convert_to_diffusers(args: argparse.Namespace) -> int:
    """A jdit run's EMA weights (or a jdit checkpoint) as a diffusers model folder."""
    from pathlib import Path

    import jax

    import jdit
    from jdit.train.loop import is_run_directory, load_trained
    from jdit.weights.export import save_diffusers

    if is_run_directory(args.src):
        run, params, step = load_trained(args.src)
        module = run.module
    else:
        module, params = jdit.models.from_pretrained(args.src)
        step = None
    if getattr(module, "scan_layers", False):  # diffusers names every block
        from jdit.nn.stack import unstack_params

        params = unstack_params(params, module.per_layer())
        module = module.clone(scan_layers=False)
    written = save_diffusers(Path(args.dst), module, jax.device_get(params),
                             overwrite=args.overwrite)
    print(json.dumps({"dst": str(written), "step": step, "format": "diffusers",
                      "model": type(module).__name__,
                      "parameters": sum(int(p.size) for p in jax.tree.leaves(params))}, indent=2))
    return 0


def _convert_lora(args: argparse.Namespace) -> int:
    """A LoRA run's EMA adapters as a diffusers (or PEFT) LoRA file."""
    from pathlib import Path

    from jdit import lora
    from jdit.train.loop import load_adapters

    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise SystemExit(f"jdit convert: {dst} exists (pass --overwrite to replace it)")
    run, adapters, step = load_adapters(args.src)
    written = lora.save(dst, adapters, run.lora, module=run.module, format=args.format)
    print(json.dumps({"dst": str(written), "step": step, "format": args.format,
                      "parameters": lora.num_params(adapters), **run.lora.to_dict()}, indent=2))
    return 0


def _lora_arg(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:SCALE`` (the ``--lora`` flag of ``jdit sample``)."""
    import math

    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(scale):
            raise SystemExit(f"jdit sample: --lora {text}: the scale must be a finite number")
        return path, scale
    return text, 1.0


def _config_overrides(extra: list[str]) -> list[str]:
    """``--config.key=value`` arguments (DESIGN's command line) -> ``key=value`` overrides."""
    out = []
    for arg in extra:
        if not arg.startswith("--config.") or "=" not in arg:
            raise SystemExit(f"jdit: unrecognised argument {arg!r} (overrides look like "
                             "--config.train.steps=100)")
        out.append(arg[len("--config."):])
    return out


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from jdit.parallel.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    from jdit.config import load_config
    from jdit.train.loop import RunStopped, train

    config = load_config(args.config, _config_overrides(extra))
    try:
        metrics = train(config, args.workdir, compile_cache=True)
    except RunStopped as e:  # saved: say so, and let `jdit train ... && next` stop here
        print(f"jdit train: {e}", file=sys.stderr)
        return e.exit_code

    print(json.dumps({"workdir": str(args.workdir), **metrics}, indent=2))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from jdit.parallel.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    from jdit import cache_command

    return cache_command.main(args)


def _multi_host(parser: argparse.ArgumentParser) -> None:
    multi = parser.add_argument_group("multi-host (or JAX_COORDINATOR_ADDRESS, "
                                      "JDIT_NUM_PROCESSES, JDIT_PROCESS_ID)")
    multi.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    multi.add_argument("--num-processes", type=positive_int, default=None)
    multi.add_argument("--process-id", type=int, default=None)
    multi.add_argument("--distributed", action="store_true",
                       help="let JAX discover the hosts (TPU pod slices, SLURM)")


def cmd_sample(args: argparse.Namespace) -> int:
    if (args.workdir is None) == (args.pretrained is None):
        raise SystemExit("jdit sample: pass exactly one of --workdir (a trained run) and "
                         "--pretrained (a diffusers pipeline folder or hub repo id)")
    if args.pretrained is not None:
        args.num = 1 if args.num is None else args.num
        return _sample_pretrained(args)
    args.num = 4 if args.num is None else args.num
    from jdit.train.loop import sample_prompts

    kwargs = {k: v for k, v in dict(guidance_scale=args.guidance_scale, solver=args.solver,
                                    num_steps=args.steps).items() if v is not None}
    if args.control_weights or args.canny:
        raise SystemExit("jdit sample: --control-weights and --canny are for --pretrained "
                         "pipelines; a control run's --workdir holds its condition LoRA")
    if len(args.control) > 1:
        raise SystemExit("jdit sample: a control run takes one --control image")
    sample_prompts(args.workdir, args.prompt, args.out, num_per_prompt=args.num, seed=args.seed,
                   loras=[_lora_arg(x) for x in args.lora],
                   control_image=args.control[0] if args.control else None, **kwargs)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _control_args(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """--control IMAGE (repeatable) with a ControlNet pipeline, or one --control-weights
    (a condition LoRA) per --control image; --control-scale one or one per image."""
    import numpy as np
    from PIL import Image

    if not args.control:
        if args.control_weights:
            raise SystemExit("jdit sample: --control-weights without a --control image")
        return {}
    if pipe.controlnet is None and len(args.control_weights) != len(args.control):
        raise SystemExit(f"jdit sample: {len(args.control)} --control images need as many "
                         f"--control-weights (condition LoRAs), got {len(args.control_weights)}"
                         " (or a ControlNet pipeline)")
    names = [pipe.load_control_lora(p, f"control_{i}") for i, p in enumerate(args.control_weights)]
    images = [Image.open(p).convert("RGB") for p in args.control]
    if args.canny:  # the condition is the images' Canny edges (jdit.control.extractors)
        from jdit.control.extractors import canny_condition

        images = [canny_condition(np.asarray(im), *args.canny) for im in images]
    scales = args.control_scale or [1.0]
    return dict(control_image=images if len(images) > 1 else images[0],
                control_scale=scales if len(scales) > 1 else scales[0],
                **({"control_adapters": names} if names else {}))


def _sample_pretrained(args: argparse.Namespace) -> int:
    """One PNG per image from a published pipeline: OUT_0.png, OUT_1.png, ... (or OUT.png)."""
    import json
    from pathlib import Path

    from jdit.pipelines import ClassToImage, TextToImage
    from jdit.pipelines.hub import model_index, resolve

    folder = resolve(args.pretrained)
    is_dit = model_index(folder)["_class_name"] == "DiTPipeline"
    kwargs = {k: v for k, v in dict(guidance_scale=args.guidance_scale, solver=args.solver,
                                    num_steps=args.steps).items() if v is not None}
    if is_dit:
        pipe = ClassToImage.from_pretrained(folder)
        labels = [int(p) for p in args.prompt for _ in range(args.num)]
        images = pipe(labels, seed=args.seed, output_type="pil", **kwargs)
    else:
        pipe = TextToImage.from_pretrained(folder)
        loras = [_lora_arg(x) for x in args.lora]
        names = [pipe.load_lora_weights(path, adapter_name=f"lora_{i}")
                 for i, (path, _) in enumerate(loras)]
        if names:
            pipe.set_adapters(names, [scale for _, scale in loras])
        control = _control_args(pipe, args)
        images = pipe(args.prompt, seed=args.seed, height=args.height, width=args.width,
                      negative_prompt=args.negative_prompt, num_images_per_prompt=args.num,
                      output_type="pil", **control, **kwargs)
    out = Path(args.out)
    paths = [out] if len(images) == 1 else [
        out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    print(json.dumps({"images": [str(p) for p in paths]}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from jdit.train.loop import evaluate

    if args.compose:
        from jdit.train.loop import evaluate_composition

        print(json.dumps(evaluate_composition([args.workdir, args.compose], caption=True,
                                              attend_each_other=args.attend_each_other),
                         indent=2))
        return 0
    print(json.dumps(evaluate(args.workdir), indent=2))
    return 0


def parse_mesh(text: str) -> dict[str, int]:
    """``data=1,fsdp=-1,tensor=2,context=4`` -> ``{"data": 1, ...}`` (the ``--mesh`` flag)."""
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--mesh looks like data=1,fsdp=-1,tensor=1,context=4; got {text!r}") from None


def _aot_pipeline(args: argparse.Namespace) -> int:
    from jdit.aot import pipeline

    print(f"compiling the {args.pipeline} pipeline for {args.topology} ...", file=sys.stderr)
    if args.max_batch:
        result = pipeline.max_batch(args.topology, args.pipeline, start=args.batch or 1,
                                    mesh=args.mesh, control=args.control)
    else:
        result = pipeline.report(args.topology, args.batch or 1, args.pipeline, mesh=args.mesh,
                                 control=args.control)
    _emit(result, args.json)
    if not result.get("fits"):
        print(f"{args.topology}: does NOT fit at per-device batch {result['per_device_batch']}",
              file=sys.stderr)
        return 1
    print(f"{args.topology}: per-device batch {result['per_device_batch']} (global "
          f"{result['global_batch']}), {result['hbm_per_device_bytes'] / 2**30:.2f} of "
          f"{result['hbm_capacity_bytes'] / 2**30:.1f} GiB; roofline "
          f"{result['roofline_total_seconds']:.2f} s per batch = "
          f"{result['images_per_second']:.2f} images/s (MFU bound {result['mfu_bound']:.2f}); "
          f"T5 weights {result['t5_parameter_bytes_per_device'] / 2**30:.2f} GiB per chip",
          file=sys.stderr)
    return 0


def cmd_aot(args: argparse.Namespace, extra: list[str]) -> int:
    import os

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # before libtpu is loaded
    if sum(x is not None for x in (args.config, args.pipeline, args.cache)) != 1:
        raise SystemExit("jdit aot: pass exactly one of --config (a train step), --pipeline "
                         "(a whole text-to-image pipeline, e.g. pixart_sigma_1024) and --cache "
                         "(the jdit cache program, e.g. sdxl_t5xxl_1024)")
    if args.pipeline:
        return _aot_pipeline(args)
    if args.cache:
        from jdit.aot import cache

        return cache.run(args)
    from jdit.aot import train_step

    config, assumed = train_step.load(args.config, _config_overrides(extra))
    for key in ("mesh", "rules"):  # the flag wins: no longer an assumption
        if getattr(args, key):
            config["parallel"][key] = getattr(args, key)
            assumed.get("parallel", {}).pop(key, None)
    assumed = {name: values for name, values in assumed.items() if values}
    kwargs = dict(caption_length=args.caption_length, sampler=args.sampler, assumed=assumed,
                  scan_layers=None if args.scan_layers == "config" else args.scan_layers == "on")
    print(f"compiling for {args.topology} ...", file=sys.stderr)
    if args.max_batch:
        result = train_step.max_batch(config, args.topology, start=args.batch or 1, **kwargs)
    else:
        result = train_step.report(config, args.topology, args.batch, **kwargs)
    _emit(result, args.json)
    if "error" in result:
        print(f"{args.topology}: per-device batch {result['per_device_batch']} does NOT fit: "
              f"{result['error']}", file=sys.stderr)
        return 1
    print(f"{args.topology}: per-device batch {result['per_device_batch']}, "
          f"{result['hbm_per_device_bytes'] / 2**30:.2f} of "
          f"{result['hbm_capacity_bytes'] / 2**30:.1f} GiB ({'fits' if result['fits'] else 'does NOT fit'}),"
          f" roofline {result['roofline_step_seconds'] * 1e3:.1f} ms/step "
          f"({result['roofline_bound_by']}-bound), MFU bound {result['roofline_mfu_bound']:.2f}, "
          f"compiled in {result['compile_seconds']:.0f} s", file=sys.stderr)
    return 0 if result["fits"] else 1


def _emit(result: dict[str, Any], path: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


# `jdit bench NAME [ARGS]`: name -> (module of jdit.benchmarks, what it measures). Each module
# owns its arguments (add_arguments) and its run (main); figures go to BENCHMARKS.md.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "forward": ("forward", "PixArt forward: jdit vs diffusers, same weights"),
    "sample": ("sample", "dpm++2m + CFG sampling vs the same forwards"),
    "pipeline": ("pipeline", "text-to-image generation: jdit vs diffusers, same pipeline"),
    "train": ("train", "PixArt training step: jdit vs diffusers + torch"),
    "bars": ("bars", "train + eval the tiny recipes against the quality bars"),
    "attention": ("attention", "softmax vs linear attention (XLA) on this CPU"),
    "scaling": ("scaling", "SANA vs PixArt block forward, 1K-16K tokens (CPU)"),
    "tiling": ("tiling", "VAE decode: untiled, blended and exact tiles"),
    "kernels": ("kernels", "Pallas kernels vs XLA attention, TPU compiles"),
    "compile": ("compile_time", "compile time of a full-size model, scan vs not"),
    "cache": ("cache", "jdit cache images/s against its encoders alone"),
    "control": ("control", "EasyControl sampling step: with the condition cache vs without"),
    "lit": ("lit", "LiT: a distilled linear-attention student against its PixArt teacher"),
    "llm": ("llm", "LI-DiT at toy scale: LLM prompt features, raw vs refined (shapes)"),
    "step-cache": ("step_cache", "sampling with step caches vs without (random PixArt, CPU)"),
    "fast": ("fast", "adherence vs seconds per image: teacher, student, caches, diffusers"),
    "arlon": ("arlon", "ARLON at toy scale: long videos chained vs AR-planned (moving_shapes)"),
}


def bench_parser(name: str) -> tuple[argparse.ArgumentParser, Any]:
    """The parser of ``jdit bench NAME`` (the benchmark module adds its arguments) and the
    module."""
    import importlib

    module_name, description = BENCHMARKS[name]
    module = importlib.import_module(f"jdit.benchmarks.{module_name}")
    parser = argparse.ArgumentParser(prog=f"jdit bench {name}", description=description)
    module.add_arguments(parser)
    parser.add_argument("--json", default=None, help="also write the result to this file")
    return parser, module


def run_bench(name: str, argv: Sequence[str]) -> int:
    """``jdit bench NAME ARGS``: the benchmark module parses ``ARGS`` itself."""
    parser, module = bench_parser(name)
    options = parser.parse_args(argv)
    return int(module.main(options, lambda result: _emit(result, options.json)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jdit", description="Diffusion transformers in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train from a config file (--config.key=value overrides)")
    train.add_argument("--config", required=True, help="config file, e.g. configs/shapes_tiny.py")
    train.add_argument("--workdir", required=True, help="run directory (resumes if it exists)")
    _multi_host(train)
    train.set_defaults(func=cmd_train, takes_extra=True)

    from jdit import cache_command

    cache = sub.add_parser("cache", help="encode a dataset (image folder, JSONL, tar shards, "
                                         "TFDS) once into a feature cache for jdit train")
    cache_command.add_arguments(cache)
    _multi_host(cache)
    cache.set_defaults(func=cmd_cache)

    from jdit.data import export

    exp = sub.add_parser("export", help="write N examples of an embedded dataset (shapes, "
                                        "digits) as a folder of PNG files with captions or labels")
    export.add_arguments(exp)
    exp.set_defaults(func=export.main)

    smp = sub.add_parser("sample", help="sample a grid from a trained workdir, or PNGs from a "
                                         "published pipeline (--pretrained)")
    smp.add_argument("--workdir", default=None, help="a jdit train run directory")
    smp.add_argument("--pretrained", default=None,
                     help="a diffusers pipeline folder or hub repo id (PixArt-α/Σ, DiT)")
    smp.add_argument("--prompt", action="append", required=True,
                     help="a prompt (text models) or class id (class models); repeatable")
    smp.add_argument("--out", default="samples.png",
                     help="the grid (--workdir), or the PNG name; several images get _0, _1, ...")
    smp.add_argument("--num", type=positive_int, default=None,
                     help="images per prompt (default 4 for a grid, 1 with --pretrained)")
    smp.add_argument("--height", type=positive_int, default=None, help="--pretrained: image height")
    smp.add_argument("--width", type=positive_int, default=None, help="--pretrained: image width")
    smp.add_argument("--negative-prompt", default="", help="--pretrained: negative prompt")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--guidance-scale", type=float, default=None)
    smp.add_argument("--solver", default=None)
    smp.add_argument("--steps", type=positive_int, default=None)
    smp.add_argument("--control", action="append", default=[], metavar="IMAGE",
                     help="a control condition image (repeatable: several conditions)")
    smp.add_argument("--control-weights", action="append", default=[], metavar="PATH",
                     help="--pretrained: a condition LoRA for the --control image at the same "
                          "place (EasyControl; a ControlNet pipeline needs none)")
    smp.add_argument("--canny", nargs=2, type=float, default=None, metavar=("LOW", "HIGH"),
                     help="--pretrained: use the --control images' Canny edges (OpenCV's, "
                          "thresholds LOW HIGH, e.g. 100 200) as the conditions")
    smp.add_argument("--control-scale", action="append", type=float, default=[],
                     help="the condition's weight (one, or one per --control)")
    smp.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                     help="a LoRA (diffusers / PEFT file or folder, or a jdit LoRA run) applied "
                          "at SCALE (default 1); repeatable")
    smp.set_defaults(func=cmd_sample)

    ev = sub.add_parser("eval", help="evaluate a trained workdir; prints JSON")
    ev.add_argument("--workdir", required=True)
    ev.add_argument("--attend-each-other", action="store_true",
                    help="with --compose: the conditions' tokens see each other (not "
                         "EasyControl's pattern; for comparison)")
    ev.add_argument("--compose", default=None, metavar="RUN",
                    help="a second control run over the same base: evaluate the two condition "
                         "LoRAs used together (zero-shot composition)")
    ev.set_defaults(func=cmd_eval)

    convert = sub.add_parser(
        "convert", help="official .pth/.pt, diffusers folder or .safetensors -> jdit checkpoint")
    convert.add_argument("src", help="checkpoint file or diffusers/jdit folder")
    convert.add_argument("dst", help="output jdit checkpoint folder")
    convert.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="model field the checkpoint does not record, e.g. num_heads=16")
    convert.add_argument("--state-dict-key", default=None,
                         help="entry of a .pth holding the weights (default: auto)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    convert.add_argument("--lora", action="store_true",
                         help="SRC is a LoRA run directory: write its adapters to DST (a "
                              ".safetensors file diffusers' load_lora_weights reads)")
    convert.add_argument("--format", default="diffusers", choices=("diffusers", "peft"),
                         help="--lora: diffusers' file (default) or a PEFT adapter folder")
    convert.add_argument("--to", default="jdit", choices=("jdit", "diffusers"),
                         help="diffusers: SRC (a jdit run or checkpoint) as a diffusers model "
                              "folder DST (PixArt: PixArtTransformer2DModel)")
    convert.set_defaults(func=cmd_convert)

    aot = sub.add_parser(
        "aot", help="compile the train step (or a whole pipeline) for a TPU topology (libtpu): "
                    "memory, FLOPs, roofline")
    aot.add_argument("--config", default=None, help="a model or training config file")
    aot.add_argument("--pipeline", default=None, choices=("pixart_sigma_1024", "tiny"),
                     help="instead: T5-XXL + PixArt-Σ + SDXL VAE, 20 CFG steps, as one program")
    aot.add_argument("--control", default=None, choices=("cached", "uncached"),
                     help="--pipeline: with one EasyControl condition at half the image's "
                          "resolution, its keys and values cached before the sampler or "
                          "recomputed in every forward")
    aot.add_argument("--cache", default=None, metavar="VARIANT",
                     help="instead: the jdit cache program, e.g. sdxl_t5xxl_1024 (SDXL VAE "
                          "encoder at 1024 px + T5-XXL at 300 tokens); see jdit/aot/cache.py")
    aot.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5p:4x4x4, v6e:4x4")
    aot.add_argument("--batch", type=positive_int, default=None,
                     help="per-device batch (default: train.batch_size over the batch shards)")
    aot.add_argument("--max-batch", action="store_true",
                     help="search the largest per-device batch that fits in HBM")
    aot.add_argument("--caption-length", type=positive_int, default=None,
                     help="caption tokens (default: 300, PixArt-Σ's T5 length)")
    aot.add_argument("--sampler", action="store_true", help="also compile the CFG sampler")
    aot.add_argument("--mesh", default=None, type=parse_mesh,
                     help="mesh axes, e.g. data=1,fsdp=-1,tensor=2,context=4 (default: the "
                          "config's parallel.mesh, else FSDP over every chip)")
    aot.add_argument("--rules", default=None, help="rule table: dp | fsdp | fsdp_tp")
    aot.add_argument("--scan-layers", choices=("off", "on", "config"), default="off",
                     help="off (default): unrolled blocks, so XLA's cost analysis counts every "
                          "layer; on: nn.scan (faster compile, costs of one loop iteration)")
    aot.add_argument("--json", default=None, help="also write the report to this file")
    aot.set_defaults(func=cmd_aot, takes_extra=True)

    bench = sub.add_parser("bench", help="benchmarks recorded in BENCHMARKS.md")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, (_, description) in BENCHMARKS.items():
        # listed here; main() hands `jdit bench NAME ...` to the benchmark's own parser
        bench_sub.add_parser(name, help=description)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHMARKS:
        return run_bench(argv[1], argv[2:])
    args, extra = build_parser().parse_known_args(argv)
    if extra and not getattr(args, "takes_extra", False):
        raise SystemExit(f"jdit: unrecognised arguments {extra}")
    try:
        return int(args.func(args, extra) if getattr(args, "takes_extra", False) else args.func(args))
    except (ValueError, KeyError, OSError, FloatingPointError) as e:
        # bad input (a path, a file, a config value) or a diverged run: one line, no traceback
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"jdit {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
