"""``jdit bench llm``: LI-DiT's claim (arXiv 2406.11831) at toy scale, on the embedded ``shapes``.

LI-DiT found that a decoder-only LLM's features, used directly as the prompt encoding, follow
prompts worse than they could: next-token training and the causal mask bias each token toward
what came before it; a small bidirectional refiner conditioned on the timestep fixes most of it.
Here, everything is trained on this machine:

1. a tiny causal language model (Llama architecture: 4 layers of width 64) on the shapes
   captions, next-token loss; captions list objects in grid order, so a causal model sees the
   second object's words only after the first's. Saved as a transformers folder with a word-level
   ``tokenizer.json`` and read back through ``jdit.text.from_pretrained`` like any LLM;
2. ``shapes_tiny`` DiT runs of equal length, the prompt encoded by (a) the word-level encoder
   used today, (b) the LM's raw features (``hidden_layer=-3``, as LI-DiT), (c) LM + the
   bidirectional token refiner, (d) LM + the refiner with a causal mask, (e) two differently
   seeded LMs fused by the collaborative refiner;
3. held-out adherence of each (``adherence_single`` / ``adherence_pair``), and for pairs how
   often each of the two objects is right (the causal bias predicts the first suffers).

The claim holds at this scale if (c) beats (b) on pairs by >= 0.05 and beats (d). The result
is reported as it comes out; the toy is not tuned toward either answer. No instruction prefix is
used: the toy LM never saw one (LI-DiT's usage guidance needs an instruction-following LLM).
Every LM variant reads the features RMS-normalised per token (``rms_norm``): the intermediate
hidden state has no final norm, and at its raw scale (RMS 4.4 against the word features' 0.5)
the first attempt learned nothing in (b) and (c) and diverged in (d) (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "shapes_tiny.py"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
LM = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
          num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0)
HIDDEN_LAYER = -3  # LI-DiT's: the third hidden state from the end
MAX_TOKENS = 16  # <bos> + the longest pair caption (15 words)
VARIANTS = {
    "a_words": "the word-level encoder (today's shapes_tiny)",
    "b_lm": "the LM's raw features",
    "c_refiner": "LM + bidirectional token refiner",
    "d_causal_refiner": "LM + token refiner with a causal mask",
    "e_collaborative": "two LMs (seeds 0, 1) + collaborative refiner",
}
MARGIN = 0.05
# The one-command experiment (<= 20 minutes on 2 cores): the three variants LI-DiT's criterion
# compares, at the longest length that fits (17:40 measured; BENCHMARKS.md). The full table:
# --variants a_words,b_lm,c_refiner,d_causal_refiner,e_collaborative --steps 2400.
DEFAULT_VARIANTS = ("b_lm", "c_refiner", "d_causal_refiner")
DEFAULT_STEPS = 1400


def word_tokenizer(folder: Path) -> list[str]:
    """A word-level ``tokenizer.json`` of the shapes vocabulary (``<bos>`` first, ``<pad>``
    pads) at ``folder``; returns the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from jdit.data import shapes
    from jdit.files import atomic_write

    vocab = list(SPECIALS) + shapes.vocabulary()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab.index("<bos>"))])
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "tokenizer.json", tok.to_str())
    atomic_write(folder / "tokenizer_config.json", json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
         "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return vocab


def _captions(rng: np.random.Generator, n: int, split: str, pair_fraction: float = 0.6
              ) -> list[str]:
    from jdit.data import shapes

    singles, pairs = shapes.prompts("single", split), shapes.prompts("pair", split)
    out = []
    for is_pair in rng.random(n) < pair_fraction:
        pool = pairs if is_pair else singles
        out.append(shapes.caption(pool[rng.integers(len(pool))]))
    return out


def train_lm(folder: Path, seed: int, steps: int, batch_size: int = 64, lr: float = 3e-3
             ) -> dict[str, float]:
    """Train the toy LM (next-token loss on ``<bos> caption <eos>``) and save it at ``folder``
    as a transformers causal-LM folder with its tokenizer. Returns its held-out next-token
    loss and accuracy (the colours, shapes and cells are chance; the grammar is not)."""
    import jax
    import jax.numpy as jnp
    import optax

    from jdit.nn import init_params
    from jdit.text import JsonTokenizer, LlamaEncoder
    from jdit.text.llama import lm_logits
    from jdit.weights.llama import save_pretrained

    vocab = word_tokenizer(folder)
    tokenizer = JsonTokenizer.from_pretrained(folder)
    eos = vocab.index("<eos>")
    module = LlamaEncoder(vocab_size=len(vocab), **LM)
    params = init_params(module, jax.random.key(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, lr / 10)
    optimizer = optax.adamw(schedule, b2=0.99, weight_decay=0.0)
    state = optimizer.init(params)

    def tokens(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        t = tokenizer(captions, MAX_TOKENS + 1)
        ids, mask = t["input_ids"], t["attention_mask"]
        ends = mask.sum(1)  # <eos> after the caption (the tokenizer adds only <bos>)
        ids[np.arange(len(ids)), ends], mask[np.arange(len(ids)), ends] = eos, 1
        return ids, mask

    def loss_fn(p: Any, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = lm_logits(p, module.apply({"params": p}, ids, mask))[:, :-1]
        target, weight = ids[:, 1:], mask[:, 1:].astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, target)
        right = (jnp.argmax(logits, -1) == target).astype(jnp.float32)
        return jnp.sum(nll * weight) / jnp.sum(weight), jnp.sum(right * weight) / jnp.sum(weight)

    @jax.jit
    def step(p: Any, s: Any, ids: jax.Array, mask: jax.Array) -> tuple[Any, Any, jax.Array]:
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, ids, mask)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x11]))
    for _ in range(steps):
        ids, mask = tokens(_captions(rng, batch_size, "train"))
        params, state, _ = step(params, state, ids, mask)
    ids, mask = tokens(_captions(np.random.default_rng(1), 512, "heldout"))
    loss, accuracy = jax.jit(loss_fn)(params, ids, mask)
    save_pretrained(folder, params, module)
    return {"heldout_loss": float(loss), "heldout_next_token_accuracy": float(accuracy)}


def variant_overrides(variant: str, lms: Sequence[Path]) -> dict[str, Any]:
    """What ``variant`` changes in ``configs/shapes_tiny.py``: the data's prompt encoders and
    the model's ``text_refiner``."""
    width = LM["hidden_size"]
    encoder = [dict(path=str(lms[0]), max_length=MAX_TOKENS, hidden_layer=HIDDEN_LAYER,
                    rms_norm=True)]
    refiner = dict(encoders=[[width, None]], width=width, depth=2, num_heads=4)
    if variant == "a_words":
        return {}
    if variant == "b_lm":
        return {"data.text_encoders": encoder}
    if variant == "c_refiner":
        return {"data.text_encoders": encoder, "model.text_refiner": refiner}
    if variant == "d_causal_refiner":
        return {"data.text_encoders": encoder, "model.text_refiner": {**refiner, "causal": True}}
    if variant == "e_collaborative":
        both = encoder + [{**encoder[0], "path": str(lms[1])}]
        return {"data.text_encoders": both, "model.text_refiner": {
            **refiner, "encoders": [[width, MAX_TOKENS]] * 2}}
    raise ValueError(f"unknown variant {variant!r}; available: {sorted(VARIANTS)}")


def _set(config: Any, key: str, value: Any) -> None:
    section, name = key.split(".")
    config[section][name] = value


def run(steps: int = DEFAULT_STEPS, lm_steps: int = 300, batch_size: int = 64, seed: int = 0,
        variants: Sequence[str] = DEFAULT_VARIANTS, num_pairs: int = 200, single_repeats: int = 2,
        overrides: Sequence[str] = (), config: str | Path = CONFIG,
        workdir: str | Path | None = None, log: Callable[[str], None] | None = None
        ) -> dict[str, Any]:
    """Train the LMs and one DiT run per variant (``steps`` each, same seed and recipe),
    evaluate them on the held-out prompts and judge LI-DiT's claim. ``overrides``:
    ``key=value`` settings of every DiT run's config."""
    from jdit.config import load_config
    from jdit.train.loop import evaluate, train

    log = log or (lambda s: print(s, file=sys.stderr))
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; available: {sorted(VARIANTS)}")
    start = time.perf_counter()
    out: dict[str, Any] = {"benchmark": "llm", "seed": seed, "steps": steps, "lm_steps": lm_steps,
                           "batch_size": batch_size, "variants": {}, "lms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        lms = [root / "lm_seed0", root / "lm_seed1"]
        needed = 2 if "e_collaborative" in variants else 1
        if any(v != "a_words" for v in variants):
            for i in range(needed):
                t0 = time.perf_counter()
                out["lms"][f"seed{i}"] = {**train_lm(lms[i], seed + i, lm_steps),
                                          "train_s": time.perf_counter() - t0}
                log(f"LM seed {seed + i}: {out['lms'][f'seed{i}']}")
        for variant in variants:
            cfg = load_config(str(config), list(overrides))
            cfg.train.steps, cfg.train.batch_size, cfg.train.seed = steps, batch_size, seed
            cfg.train.sample_every, cfg.train.checkpoint_every = 0, steps
            cfg.optim.warmup_steps = min(int(cfg.optim.warmup_steps), steps // 5)
            for key, value in variant_overrides(variant, lms).items():
                _set(cfg, key, value)
            t0 = time.perf_counter()
            train(cfg, root / variant, quiet=True)
            train_s = time.perf_counter() - t0
            result = evaluate(root / variant, num_pairs=num_pairs, single_repeats=single_repeats)
            keep = ("adherence_single", "adherence_pair", "adherence_pair_first",
                    "adherence_pair_second")
            out["variants"][variant] = {**{k: result[k] for k in keep if k in result},
                                        "train_s": train_s,
                                        "eval_s": time.perf_counter() - t0 - train_s}
            log(f"{variant}: {out['variants'][variant]}")
    v = out["variants"]
    if {"b_lm", "c_refiner", "d_causal_refiner"} <= set(v) and num_pairs:
        pair = {k: v[k]["adherence_pair"] for k in v}
        out["claim"] = {"refiner_beats_raw_by_margin":
                        pair["c_refiner"] - pair["b_lm"] >= MARGIN,
                        "bidirectional_beats_causal": pair["c_refiner"] > pair["d_causal_refiner"]}
        out["claim_holds"] = all(out["claim"].values())
    out["total_s"] = time.perf_counter() - start
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DiT steps per variant")
    parser.add_argument("--lm-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default: the three the "
                             f"claim compares)")
    parser.add_argument("--pairs", type=int, default=200, help="held-out pair prompts")
    parser.add_argument("--single-repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: temporary)")


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    result = run(args.steps, args.lm_steps, args.batch_size, args.seed,
                 [v for v in args.variants.split(",") if v], args.pairs, args.single_repeats,
                 workdir=args.workdir)
    emit(result)
    for name, r in result["variants"].items():
        print(f"{name:18s} single {r.get('adherence_single', float('nan')):.3f}  pair "
              f"{r.get('adherence_pair', float('nan')):.3f} (first "
              f"{r.get('adherence_pair_first', float('nan')):.3f}, second "
              f"{r.get('adherence_pair_second', float('nan')):.3f})  {VARIANTS[name]}",
              file=sys.stderr)
    if "claim_holds" in result:
        print(f"LI-DiT's claim {'holds' if result['claim_holds'] else 'does not hold'} at this "
              f"scale: {result['claim']}", file=sys.stderr)
    return 0
