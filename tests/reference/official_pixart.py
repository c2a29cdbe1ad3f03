"""A PyTorch transcription of the official PixArt-α/Σ network (``PixArtMS`` of the Σ repo).

Written for the tests from the published architecture description (docs/models.md): state-dict
names follow the official checkpoints, KV compression and QK-norm included. Attention uses an
explicit softmax with masked keys removed, the math of the official xformers calls.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sinusoid(t: torch.Tensor, dim: int = 256, shift: float = 0.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - shift))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def pos_embed(dim: int, h: int, w: int, base: int, scale: float) -> torch.Tensor:
    gh = np.arange(h, dtype=np.float32) / (h / base) / scale
    gw = np.arange(w, dtype=np.float32) / (w / base) / scale
    gw2, gh2 = np.meshgrid(gw, gh)  # (h, w) grids; the x coordinate goes first

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one(dim // 2, gw2), one(dim // 2, gh2)], axis=1)
    return torch.from_numpy(emb).float()[None]


class Embedder(nn.Module):
    """``TimestepEmbedder`` / ``SizeEmbedder``: keys ``mlp.0``, ``mlp.2``."""

    def __init__(self, hidden: int, shift: float = 0.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.shift = shift

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        b = s.shape[0]
        return self.mlp(sinusoid(s.reshape(-1), shift=self.shift)).reshape(b, -1)


class Mlp(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def attention(q, k, v, heads, key_mask=None):
    b, n, c = q.shape
    q, k, v = (z.reshape(b, z.shape[1], heads, c // heads).transpose(1, 2) for z in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(c // heads)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


class KVCompressAttention(nn.Module):
    def __init__(self, dim, heads, sampling=None, sr_ratio=1, qk_norm=False):
        super().__init__()
        self.heads, self.sampling, self.sr_ratio = heads, sampling, sr_ratio
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        if sr_ratio > 1 and sampling == "conv":
            self.sr = nn.Conv2d(dim, dim, groups=dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr.weight.data.fill_(1 / sr_ratio**2)
            self.sr.bias.data.zero_()
            self.norm = nn.LayerNorm(dim)
        self.q_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()

    def downsample(self, x, h, w):
        r = self.sr_ratio
        if self.sampling is None or r == 1:
            return x
        b, n, c = x.shape
        if self.sampling == "uniform_every":
            return x[:, ::r]
        g = x.reshape(b, h, w, c).permute(0, 3, 1, 2)
        if self.sampling == "ave":
            g = F.interpolate(g, scale_factor=1 / r, mode="nearest")
        elif self.sampling == "uniform":
            g = g[:, :, ::r, ::r]
        elif self.sampling == "conv":
            return self.norm(self.sr(g).reshape(b, c, -1).permute(0, 2, 1))
        return g.permute(0, 2, 3, 1).reshape(b, -1, c)

    def forward(self, x, hw):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, c).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        k, v = self.downsample(k, *hw), self.downsample(v, *hw)
        return self.proj(attention(q, k, v, self.heads))


class CrossAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_linear, self.kv_linear = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, y, mask):
        b, n, c = x.shape
        k, v = self.kv_linear(y).reshape(b, -1, 2, c).unbind(2)
        return self.proj(attention(self.q_linear(x), k, v, self.heads, mask))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, sampling, sr_ratio, qk_norm):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = KVCompressAttention(dim, heads, sampling, sr_ratio, qk_norm)
        self.cross_attn = CrossAttention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x, y, t0, mask, hw):
        b = x.shape[0]
        sm, cm, gm, sf, cf, gf = (self.scale_shift_table[None] + t0.reshape(b, 6, -1)).chunk(6, 1)
        x = x + gm * self.attn(self.norm1(x) * (1 + cm) + sm, hw)
        x = x + self.cross_attn(x, y, mask)
        return x + gf * self.mlp(self.norm2(x) * (1 + cf) + sf)


class FinalLayer(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x, t):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class PatchEmbed(nn.Module):
    def __init__(self, p, c, dim):
        super().__init__()
        self.proj = nn.Conv2d(c, dim, kernel_size=p, stride=p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class CaptionEmbedder(nn.Module):
    def __init__(self, c_in, dim, tokens):
        super().__init__()
        self.y_proj = Mlp(c_in, dim, dim)
        self.register_buffer("y_embedding", nn.Parameter(torch.randn(tokens, c_in) / c_in**0.5))


class OfficialPixArt(nn.Module):
    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=3,
                 num_heads=4, mlp_ratio=4.0, caption_channels=24, pe_interpolation=1.0,
                 micro_condition=False, qk_norm=False, sampling=None, scale_factor=1,
                 kv_compress_layer=(), model_max_length=120, learn_sigma=True):
        super().__init__()
        d = hidden_size
        self.p, self.out_channels = patch_size, in_channels * (2 if learn_sigma else 1)
        self.base_size, self.pe_interpolation = input_size // patch_size, pe_interpolation
        self.x_embedder = PatchEmbed(patch_size, in_channels, d)
        self.t_embedder = Embedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.y_embedder = CaptionEmbedder(caption_channels, d, model_max_length)
        self.micro = micro_condition
        if micro_condition:
            self.csize_embedder, self.ar_embedder = Embedder(d // 3), Embedder(d // 3)
        self.blocks = nn.ModuleList([
            Block(d, num_heads, mlp_ratio, sampling,
                  scale_factor if i in kv_compress_layer else 1, qk_norm) for i in range(depth)
        ])
        self.final_layer = FinalLayer(d, patch_size**2 * self.out_channels)
        # The stale training-grid buffer every official checkpoint carries.
        self.register_buffer("pos_embed", pos_embed(d, self.base_size, self.base_size,
                                                    self.base_size, pe_interpolation))

    def forward(self, x, t, y, mask, img_hw=None, aspect_ratio=None):
        b, _, hh, ww = x.shape
        h, w = hh // self.p, ww // self.p
        pe = pos_embed(self.pos_embed.shape[-1], h, w, self.base_size, self.pe_interpolation)
        x = self.x_embedder(x) + pe
        temb = self.t_embedder(t)
        if self.micro:
            temb = temb + torch.cat([self.csize_embedder(img_hw), self.ar_embedder(aspect_ratio)], 1)
        t0 = self.t_block(temb)
        y = self.y_embedder.y_proj(y)
        for block in self.blocks:
            x = block(x, y, t0, mask, (h, w))
        x = self.final_layer(x, temb)
        x = x.reshape(b, h, w, self.p, self.p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, self.out_channels, hh, ww)
