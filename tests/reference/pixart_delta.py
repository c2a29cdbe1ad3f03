"""PixArt-δ's ControlNet-Transformer wired around diffusers' own PixArtTransformer2DModel, as
the PixArt-α repository's ``ControlPixArtHalf`` (and diffusers' research project) run it: copy 0
reads the base's block-0 output plus ``before_proj`` of the condition's patch embedding, copy
``i`` the output of copy ``i - 1``; ``after_proj_i`` of copy ``i``'s output is added to the
hidden states before base block ``i + 1``. Hooks on the diffusers blocks do the wiring, so the
base and the copies are diffusers' own modules (a reference for the parity tests only)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class PixArtDeltaReference(nn.Module):
    def __init__(self, base: nn.Module, num_copies: int) -> None:
        super().__init__()
        self.base = base
        d = base.config.num_attention_heads * base.config.attention_head_dim
        self.copies = nn.ModuleList(copy.deepcopy(base.transformer_blocks[i])
                                    for i in range(num_copies))
        self.before_proj = nn.Linear(d, d)
        self.after_proj = nn.ModuleList(nn.Linear(d, d) for _ in range(num_copies))
        self.condition: torch.Tensor | None = None  # patch-embedded by the base at every call
        self.scale = 1.0
        self._skips: list[torch.Tensor] = []
        base.transformer_blocks[0].register_forward_hook(self._run_copies, with_kwargs=True)
        for i in range(num_copies):
            base.transformer_blocks[i + 1].register_forward_pre_hook(
                self._adder(i), with_kwargs=True)

    def _run_copies(self, block, args, kwargs, out):
        self._skips = []
        if self.condition is None:
            return None
        c = out + self.before_proj(self.base.pos_embed(self.condition))
        for copied, after in zip(self.copies, self.after_proj, strict=True):
            c = copied(c, **kwargs)
            self._skips.append(after(c) * self.scale)
        return None

    def _adder(self, i):
        def add(block, args, kwargs):
            if not self._skips:
                return None
            return (args[0] + self._skips[i], *args[1:]), kwargs
        return add

    def load_diffusers(self, sd: dict[str, torch.Tensor]) -> None:
        """Weights named as diffusers' research project's ``PixArtControlNetAdapterModel``."""
        for i, block in enumerate(self.copies):
            block.load_state_dict({k.split(".transformer_block.", 1)[1]: v for k, v in sd.items()
                                   if k.startswith(f"controlnet_blocks.{i}.transformer_block.")})
            self.after_proj[i].load_state_dict(
                {wb: sd[f"controlnet_blocks.{i}.after_proj.{wb}"] for wb in ("weight", "bias")})
        self.before_proj.load_state_dict(
            {wb: sd[f"controlnet_blocks.0.before_proj.{wb}"] for wb in ("weight", "bias")})

    def forward(self, x, t, y, mask, condition=None, scale=1.0):
        self.condition, self.scale = condition, scale
        try:
            return self.base(x, encoder_hidden_states=y, timestep=t,
                             encoder_attention_mask=mask).sample
        finally:
            self.condition, self._skips = None, []
