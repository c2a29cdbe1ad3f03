"""LiT: a PixArt turned into a linear-attention DiT by weight inheritance and distillation.

LiT (arXiv 2501.12976) found that a linear DiT learns fastest when it starts from a converged
softmax DiT with every weight copied *except* the attention's, uses few linear heads and a
depthwise convolution on V, and is distilled from the frozen teacher (its predicted noise and
variance). The student is ``PixArt(self_attention="linear", linear_heads=..., linear_v_conv=5)``;
:func:`student_config` derives it, :func:`inherit` copies the weights and reports what it did
not copy, and ``train.distill`` (``jdit.train.step``) adds the teacher terms to the loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import linen as nn

from jdit.nn.init import init_params
from jdit.weights.state_dict import Tree, flatten, unflatten


def student_config(teacher: Mapping[str, Any], linear_heads: int = 2,
                   linear_v_conv: int = 5) -> dict[str, Any]:
    """The LiT student's model config from a PixArt teacher's (few heads, a 5×5 conv on V)."""
    if teacher.get("family") != "pixart":
        raise ValueError(f"LiT students are built from PixArt teachers, got family "
                         f"{teacher.get('family')!r}")
    fields = dict(teacher)
    for softmax_only in ("kv_compress", "kv_compress_layers", "qk_norm"):
        fields.pop(softmax_only, None)
    return {**fields, "self_attention": "linear", "linear_heads": linear_heads,
            "linear_v_conv": linear_v_conv}


def _attention_specific(path: str) -> bool:
    parts = path.split("/")
    return len(parts) > 1 and parts[1] == "attn"  # block_i/attn/...: the self-attention


def inherit(teacher_params: Tree, student: nn.Module, rng: jax.Array, *,
            load_attention: bool = False) -> tuple[Tree, dict[str, list[str]]]:
    """Student parameters: the teacher's wherever name and shape agree, except the self-attention
    (LiT's guideline: freshly initialised attention learns better than inherited softmax weights;
    ``load_attention=True`` copies those too where shapes agree). Returns the parameters and a
    report: ``inherited``, ``initialised`` (the attention-specific and any mismatched weights)
    and ``unused`` (teacher weights the student has no place for)."""
    fresh = flatten(init_params(student, rng))
    teacher = flatten(teacher_params)
    out, report = {}, {"inherited": [], "initialised": [], "unused": []}
    for path, value in fresh.items():
        source = teacher.get(path)
        usable = source is not None and tuple(source.shape) == tuple(value.shape)
        if usable and (load_attention or not _attention_specific(path)):
            out[path] = source
            report["inherited"].append(path)
        else:
            out[path] = value
            report["initialised"].append(path)
    report["unused"] = sorted(set(teacher) - set(fresh))
    return unflatten(out), report
