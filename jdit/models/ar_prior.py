"""ARLON's autoregressive prior: a decoder-only transformer over a whole video's VQ tokens, with
the text features as its prefix.

    prior = ARPrior(codebook_size=512, text_dim=4096, grid_hw=(4, 4))
    params = jdit.nn.init_params(prior, jax.random.key(0))
    logits = prior.apply({"params": params}, prefix, prefix_mask, tokens)   # (B, N, K)
    loss, metrics = ar_loss(prior, params, prefix, prefix_mask, tokens)
    tokens = prior.generate(params, prefix, prefix_mask, num_tokens, rng)   # (B, N) int32

The sequence is ``[text features (L) | BOS | video tokens 0..N-2]``; the output at BOS predicts
token 0 and the output at token ``j`` predicts token ``j+1`` (next-token cross-entropy on the
video tokens only). Video tokens are the VQ grid (t, h, w) flattened row-major (time, row,
column); ``grid_hw`` = (h, w) is the model's spatial token grid.

Choices where ARLON (arXiv 2410.20502) is silent (for ``docs/video.md``):

- **Blocks**: pre-RMSNorm, multi-head self-attention with a fused ``qkv`` (D, 3, H, Dh), tanh-GELU
  MLP (jdit's ``Mlp``), final RMSNorm, an untied LM head. Written here rather than reusing
  ``jdit.text.llama``, whose layers have no KV cache.
- **Text prefix**: features (B, L, D_text) → Dense to the width; padded prefix tokens are
  invisible keys (their own outputs are never read). Attention is causal over the whole
  sequence, prefix included (a decoder-only LM with a prompt).
- **Positions**: 3-D rotary (interleaved pairs, ``jdit.nn.rotary``) with head channels split
  ``rope_axes`` over (sequence/time, row, column): prefix token ``i`` at ``(i, 0, 0)``, BOS at
  ``(L, 0, 0)``, video token ``(t, y, x)`` at ``(L + 1 + t, y, x)``. A video of any length runs
  (no learned table to outgrow); train and sample with prefixes padded to the same ``L``.
- **No EOS**: the token count of a video is known from its frame count (``num_tokens`` =
  t·h·w), so generation stops there.
- **Generation**: prefill of prefix + BOS, then one ``lax.scan`` over the tokens with a KV cache
  per layer (B, L + N, H, Dh); greedy when ``temperature == 0``, otherwise softmax sampling at
  that temperature, optionally restricted to the ``top_k`` most likely codes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jdit.nn.layers import MLP_NAMES, TOKEN_NAMES, Array, Dense, DType, Mlp, RMSNorm, constrain
from jdit.nn.rotary import apply_rotary_interleaved, rotary_cos_sin

Cache = list[tuple[Array, Array]]  # per layer: keys, values (B, S, H, Dh)


def masked_attention(q: Array, k: Array, v: Array, allowed: Array) -> Array:
    """Softmax attention of q (B, Lq, H, D) over k, v (B, Lk, H, D); ``allowed`` (B, Lq, Lk)
    says which keys each query sees. Logits and softmax in float32."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(allowed[:, None], logits * q.shape[-1] ** -0.5, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def token_positions(slots: Array, prefix_len: int, grid_hw: tuple[int, int]) -> Array:
    """3-D positions (..., 3) int32 of sequence ``slots`` (see the module docstring)."""
    h, w = grid_hw
    j = jnp.maximum(slots - prefix_len - 1, 0)  # video token carried by the slot
    video = jnp.stack([prefix_len + 1 + j // (h * w), (j // w) % h, j % w], axis=-1)
    text = jnp.stack([slots, jnp.zeros_like(slots), jnp.zeros_like(slots)], axis=-1)
    return jnp.where((slots > prefix_len)[..., None], video, text).astype(jnp.int32)


class ARLayer(nn.Module):
    """Pre-norm attention + MLP; with a cache, writes this call's keys/values at ``index``."""

    num_heads: int
    mlp_hidden: int
    eps: float
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, allowed: Array,
                 cache: tuple[Array, Array] | None = None,
                 index: Array | int = 0) -> tuple[Array, tuple[Array, Array]]:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, heads = x.shape[-1], self.num_heads
        h = RMSNorm(self.eps, param_dtype=self.param_dtype, name="attn_norm")(x)
        qkv = Dense((3, heads, d // heads), ("embed",), (None, "heads", "kv"), use_bias=False,
                    name="qkv", **common)(h)
        q, k, v = (qkv[:, :, i] for i in range(3))
        q, k = apply_rotary_interleaved(q, cos, sin), apply_rotary_interleaved(k, cos, sin)
        if cache is not None:
            at = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
        out = masked_attention(q, k, v, allowed)
        x = x + Dense(d, ("heads", "kv"), ("embed",), name="out", **common)(out)
        h = RMSNorm(self.eps, param_dtype=self.param_dtype, name="mlp_norm")(x)
        x = x + Mlp(self.mlp_hidden, d, hidden_names=MLP_NAMES, name="mlp", **common)(h)
        return constrain(x, TOKEN_NAMES), (k, v)


class ARPrior(nn.Module):
    """``apply(params, prefix (B, L, text_dim), prefix_mask (B, L), tokens (B, N)) -> logits
    (B, N, codebook_size)`` float32: position ``n`` predicts ``tokens[:, n]`` from the prefix and
    ``tokens[:, :n]`` (teacher forcing)."""

    codebook_size: int
    text_dim: int
    grid_hw: tuple[int, int] = (4, 4)
    width: int = 256
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    rope_axes: tuple[int, int, int] | None = None  # head channels per (time, row, col) axis
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def setup(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"ARPrior: width {self.width} is not divisible by {self.num_heads} "
                             "heads")
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed = self.param("embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")),
            (self.codebook_size, self.width), self.param_dtype)
        self.bos = self.param("bos", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed",)), (self.width,), self.param_dtype)
        self.text_proj = Dense(self.width, ("caption",), ("embed",), **common)
        self.layers = [ARLayer(self.num_heads, int(self.width * self.mlp_ratio), self.norm_eps,
                               **common) for _ in range(self.num_layers)]
        self.final_norm = RMSNorm(self.norm_eps, param_dtype=self.param_dtype)
        self.head = Dense(self.codebook_size, ("embed",), ("vocab",), use_bias=False, **common)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def axes_dim(self) -> tuple[int, int, int]:
        if self.rope_axes is not None:
            axes = tuple(self.rope_axes)
        else:  # half the channels for the sequence/time axis, a quarter each for rows, columns
            quarter = 2 * (self.head_dim // 8)
            axes = (self.head_dim - 2 * quarter, quarter, quarter)
        if sum(axes) != self.head_dim or any(a <= 0 or a % 2 for a in axes):
            raise ValueError(f"ARPrior: rope_axes {axes} must be three positive even numbers "
                             f"summing to the head dimension {self.head_dim}")
        return axes

    def example_inputs(self, batch: int = 1, prefix_len: int = 3,
                       num_tokens: int = 4) -> dict[str, Array]:
        return {"prefix": jnp.zeros((batch, prefix_len, self.text_dim), jnp.float32),
                "prefix_mask": jnp.ones((batch, prefix_len), jnp.int32),
                "tokens": jnp.zeros((batch, num_tokens), jnp.int32)}

    # --- pieces shared by the full forward and the cached steps -------------------------------

    def _rotary(self, slots: Array, prefix_len: int, total_len: int) -> tuple[Array, Array]:
        h, w = self.grid_hw
        time_len = prefix_len + 2 + total_len // (h * w)  # static table sizes
        pos = token_positions(slots, prefix_len, (h, w))
        return rotary_cos_sin(pos[None], self.axes_dim, (time_len, h, w), self.rope_theta)

    def _embed_tokens(self, tokens: Array) -> Array:
        # Codes outside the codebook embed as NaN (a traced input cannot raise).
        table = self.embed.astype(self.dtype)
        return jnp.take(table, tokens, axis=0, mode="fill", fill_value=jnp.nan)

    def _prefix_and_bos(self, prefix: Array) -> Array:
        b = prefix.shape[0]
        text = self.text_proj(prefix.astype(self.dtype))
        bos = jnp.broadcast_to(self.bos.astype(self.dtype), (b, 1, self.width))
        return jnp.concatenate([text, bos], axis=1)

    def _logits(self, x: Array) -> Array:
        return self.head(self.final_norm(x)).astype(jnp.float32)

    def _check(self, prefix: Array, prefix_mask: Array, tokens: Array | None = None) -> None:
        if prefix.ndim != 3 or prefix.shape[-1] != self.text_dim:
            raise ValueError(f"ARPrior: prefix must be (B, L, {self.text_dim}) text features, got "
                             f"shape {prefix.shape}")
        if prefix_mask.shape != prefix.shape[:2]:
            raise ValueError(f"ARPrior: prefix_mask {prefix_mask.shape} must be (B, L) = "
                             f"{prefix.shape[:2]}")
        if tokens is not None:
            if tokens.ndim != 2 or tokens.shape[0] != prefix.shape[0] or tokens.shape[1] < 1:
                raise ValueError(f"ARPrior: tokens must be (B, N) = ({prefix.shape[0]}, N >= 1) "
                                 f"flat VQ codes, got shape {tokens.shape}")
            if not jnp.issubdtype(tokens.dtype, jnp.integer):
                raise ValueError(f"ARPrior: tokens must be integer codes, got {tokens.dtype}")
            if not isinstance(tokens, jax.core.Tracer):
                arr = np.asarray(tokens)
                bad = arr[(arr < 0) | (arr >= self.codebook_size)]
                if bad.size:
                    raise ValueError(f"ARPrior: token {int(bad[0])} is outside the codebook "
                                     f"[0, {self.codebook_size}): tokens from another codebook "
                                     "size?")

    # --- the full (teacher-forced) forward ----------------------------------------------------

    def __call__(self, prefix: Array, prefix_mask: Array, tokens: Array) -> Array:
        self._check(prefix, prefix_mask, tokens)
        (b, lp), n = prefix_mask.shape, tokens.shape[1]
        x = jnp.concatenate([self._prefix_and_bos(prefix), self._embed_tokens(tokens[:, :-1])], 1)
        x = constrain(x, TOKEN_NAMES)
        s = lp + n
        slots = jnp.arange(s)
        cos, sin = self._rotary(slots, lp, s)
        keys = jnp.concatenate([prefix_mask.astype(bool), jnp.ones((b, n), bool)], axis=1)
        allowed = (slots[None, :] <= slots[:, None])[None] & keys[:, None, :]
        for layer in self.layers:
            x, _ = layer(x, cos, sin, allowed)
        return self._logits(x[:, lp:])

    # --- cached generation --------------------------------------------------------------------

    def prefill(self, prefix: Array, prefix_mask: Array, cache_len: int) -> tuple[Array, Cache]:
        """Run prefix + BOS; return the logits for token 0 (B, K) and each layer's keys/values
        in a cache of ``cache_len`` slots (zeros past the first L + 1)."""
        self._check(prefix, prefix_mask)
        b, lp = prefix_mask.shape
        x = self._prefix_and_bos(prefix)
        slots = jnp.arange(lp + 1)
        cos, sin = self._rotary(slots, lp, cache_len)
        keys = jnp.concatenate([prefix_mask.astype(bool), jnp.ones((b, 1), bool)], axis=1)
        allowed = (slots[None, :] <= slots[:, None])[None] & keys[:, None, :]
        cache = []
        for layer in self.layers:
            x, (k, v) = layer(x, cos, sin, allowed)
            pad = ((0, 0), (0, cache_len - lp - 1), (0, 0), (0, 0))
            cache.append((jnp.pad(k, pad), jnp.pad(v, pad)))
        return self._logits(x[:, -1]), cache

    def step(self, tokens: Array, index: Array, cache: Cache,
             prefix_mask: Array) -> tuple[Array, Cache]:
        """Feed video tokens (B,) at sequence slot ``index`` (= L + 1 + their position); return
        the logits for the next token (B, K) and the updated cache."""
        b, lp = prefix_mask.shape
        cache_len = cache[0][0].shape[1]
        x = self._embed_tokens(tokens[:, None])
        cos, sin = self._rotary(jnp.reshape(index, (1,)), lp, cache_len)
        slots = jnp.arange(cache_len)
        keys = jnp.concatenate([prefix_mask.astype(bool),
                                jnp.ones((b, cache_len - lp), bool)], axis=1)
        allowed = (keys & (slots <= index)[None])[:, None, :]
        new = []
        for layer, kv in zip(self.layers, cache, strict=True):
            x, kv = layer(x, cos, sin, allowed, kv, index)
            new.append(kv)
        return self._logits(x[:, 0]), new

    def generate(self, params: Any, prefix: Array, prefix_mask: Array, num_tokens: int,
                 rng: Array, temperature: float = 1.0, top_k: int | None = None,
                 return_logits: bool = False) -> Array | tuple[Array, Array]:
        """Sample ``num_tokens`` video tokens (B, N) int32 after the prefix, in one compiled
        program (prefill + ``lax.scan`` over a KV cache). ``temperature`` 0 is greedy;
        ``return_logits`` also returns the logits each token was drawn from (B, N, K)."""
        self._check(prefix, prefix_mask)
        if int(num_tokens) < 1:
            raise ValueError(f"ARPrior.generate: num_tokens must be >= 1, got {num_tokens}")
        if top_k is not None and not 1 <= int(top_k) <= self.codebook_size:
            raise ValueError(f"ARPrior.generate: top_k must be in [1, {self.codebook_size}], got "
                             f"{top_k}")
        tokens, logits = _generate(self, params, prefix, prefix_mask, rng,
                                   jnp.asarray(temperature, jnp.float32), int(num_tokens),
                                   None if top_k is None else int(top_k))
        return (tokens, logits) if return_logits else tokens


def sample_logits(rng: Array, logits: Array, temperature: Array,
                  top_k: int | None = None) -> Array:
    """One code per row of ``logits`` (B, K): argmax when ``temperature <= 0``, else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits."""
    greedy = jnp.argmax(logits, axis=-1)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    drawn = jax.random.categorical(rng, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _generate(prior: ARPrior, params: Any, prefix: Array, prefix_mask: Array, rng: Array,
              temperature: Array, num_tokens: int, top_k: int | None) -> tuple[Array, Array]:
    variables = {"params": params}
    lp = prefix.shape[1]
    logits, cache = prior.apply(variables, prefix, prefix_mask, lp + num_tokens, method="prefill")

    def body(carry, n):
        cache, logits = carry
        token = sample_logits(jax.random.fold_in(rng, n), logits, temperature, top_k)
        nxt, cache = prior.apply(variables, token, lp + 1 + n, cache, prefix_mask, method="step")
        return (cache, nxt), (token, logits)

    (_, last), (tokens, seen) = jax.lax.scan(body, (cache, logits), jnp.arange(num_tokens - 1))
    final = sample_logits(jax.random.fold_in(rng, num_tokens - 1), last, temperature, top_k)
    tokens = jnp.concatenate([tokens.T, final[:, None]], axis=1)
    return tokens, jnp.concatenate([jnp.swapaxes(seen, 0, 1), last[:, None]], axis=1)


def ar_loss(prior: ARPrior, params: Any, prefix: Array, prefix_mask: Array,
            tokens: Array) -> tuple[Array, dict[str, Array]]:
    """Mean next-token cross-entropy over the video tokens, and ``accuracy`` (argmax hits)."""
    logits = prior.apply({"params": params}, prefix, prefix_mask, tokens)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    loss = jnp.mean(nll)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == tokens).astype(jnp.float32))
    return loss, {"loss": loss, "accuracy": accuracy}
