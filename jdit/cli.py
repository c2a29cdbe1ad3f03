"""The ``jdit`` command line: ``jdit convert`` and ``jdit bench forward | sample | compile``."""

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


def cmd_convert(args: argparse.Namespace) -> int:
    import jax

    import jdit

    overrides = _overrides(args.set)
    print(f"reading {args.src} ...", file=sys.stderr)
    module, params = jdit.models.from_pretrained(args.src, state_dict_key=args.state_dict_key,
                                                 **overrides)
    jdit.models.save_pretrained(module, params, args.dst, overwrite=args.overwrite)
    arch = jdit.models.architecture(module)
    count = sum(int(p.size) for p in jax.tree.leaves(params))
    print(json.dumps({"dst": str(args.dst), "parameters": count, "model": arch}, indent=2))
    return 0


def _emit(result: dict[str, Any], path: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


def cmd_bench_forward(args: argparse.Namespace) -> int:
    from jdit.benchmarks import forward

    result = forward.run(repeats=args.repeats, threads=args.threads)
    _emit(result, args.json)
    print(f"diffusers {result['diffusers_s']:.3f} s, jdit {result['jdit_s']:.3f} s: jdit is "
          f"{result['speedup']:.2f}x diffusers (matmul peak jax {result['jax_matmul_gflops']:.0f} "
          f"/ torch {result['torch_matmul_gflops']:.0f} GFLOP/s)", file=sys.stderr)
    return 0


def cmd_bench_sample(args: argparse.Namespace) -> int:
    from jdit.benchmarks import sample

    result = sample.run(repeats=args.repeats, num_steps=args.steps)
    _emit(result, args.json)
    print(f"sampling {result['sample_s']:.2f} s vs {args.steps} forwards "
          f"{result['forwards_s']:.2f} s: ratio {result['ratio']:.3f}; recompiled on new noise: "
          f"{result['recompiled_on_new_noise']}", file=sys.stderr)
    return 0


def cmd_bench_compile(args: argparse.Namespace) -> int:
    from jdit.benchmarks import compile_time

    _emit(compile_time.run(args.preset, grad=not args.forward_only), args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jdit", description="Diffusion transformers in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser(
        "convert", help="official .pth/.pt, diffusers folder or .safetensors -> jdit checkpoint")
    convert.add_argument("src", help="checkpoint file or diffusers/jdit folder")
    convert.add_argument("dst", help="output jdit checkpoint folder")
    convert.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="model field the checkpoint does not record, e.g. num_heads=16")
    convert.add_argument("--state-dict-key", default=None,
                         help="entry of a .pth holding the weights (default: auto)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    convert.set_defaults(func=cmd_convert)

    bench = sub.add_parser("bench", help="benchmarks recorded in BENCHMARKS.md")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    fwd = bench_sub.add_parser("forward", help="PixArt forward: jdit vs diffusers, same weights")
    fwd.add_argument("--repeats", type=int, default=7)
    fwd.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    fwd.add_argument("--json", default=None, help="also write the result to this file")
    fwd.set_defaults(func=cmd_bench_forward)
    smp = bench_sub.add_parser("sample", help="dpm++2m + CFG sampling vs the same forwards")
    smp.add_argument("--repeats", type=int, default=3)
    smp.add_argument("--steps", type=int, default=20)
    smp.add_argument("--json", default=None)
    smp.set_defaults(func=cmd_bench_sample)
    comp = bench_sub.add_parser("compile", help="compile time of a full-size model, scan vs not")
    comp.add_argument("--preset", default="pixart_sigma_xl2_1024")
    comp.add_argument("--forward-only", action="store_true", help="skip the gradient program")
    comp.add_argument("--json", default=None)
    comp.set_defaults(func=cmd_bench_compile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
