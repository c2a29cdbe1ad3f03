"""A PyTorch transcription of the official DiT (facebookresearch/DiT ``models.py`` semantics).

State-dict names follow the released ``DiT-XL-2-*.pt`` files. ``freq_shift`` and ``mlp_norm_eps``
let the same module reproduce diffusers' port (1 and 1e-5) for validating this transcription.
"""

from __future__ import annotations

import torch
from torch import nn

from tests.reference.official_pixart import Embedder, Mlp, PatchEmbed, attention, pos_embed


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, c).unbind(2)
        return self.proj(attention(q, k, v, self.heads))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, mlp_norm_eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        sm, cm, gm, sf, cf, gf = (z[:, None] for z in self.adaLN_modulation(c).chunk(6, dim=1))
        x = x + gm * self.attn(self.norm1(x) * (1 + cm) + sm)
        return x + gf * self.mlp(self.norm2(x) * (1 + cf) + sf)


class FinalLayer(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale[:, None]) + shift[:, None])


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)


class OfficialDiT(nn.Module):
    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2,
                 num_heads=4, mlp_ratio=4.0, num_classes=10, learn_sigma=True,
                 freq_shift=0.0, mlp_norm_eps=1e-6):
        super().__init__()
        d = hidden_size
        self.p, self.out_channels = patch_size, in_channels * (2 if learn_sigma else 1)
        self.x_embedder = PatchEmbed(patch_size, in_channels, d)
        self.t_embedder = Embedder(d, shift=freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, d)
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(pos_embed(d, grid, grid, grid, 1.0), requires_grad=False)
        self.blocks = nn.ModuleList([Block(d, num_heads, mlp_ratio, mlp_norm_eps)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(d, patch_size**2 * self.out_channels)

    def forward(self, x, t, labels):
        b, _, hh, ww = x.shape
        h, w = hh // self.p, ww // self.p
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder.embedding_table(labels)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c).reshape(b, h, w, self.p, self.p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, self.out_channels, hh, ww)
