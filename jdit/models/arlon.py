"""ARLON's video DiT: a frozen video DiT plus the semantic injection of a coarse plan.

    dit = build("latte", ...)                          # trained, then frozen
    arlon = ArlonDiT(dit=with_injection(dit), adapter_width=64, patch_size=dit.patch_size)
    params = arlon_params(init_params(arlon, key), dit_params)  # jdit.nn.init_params   # the DiT's own weights inside
    v = arlon.apply({"params": params}, x, t, context=c, context_mask=m, coarse=z)

The coarse latent ``z`` (B, T, H, W, C) (the VQ-VAE's decoding of the AR model's tokens, the
segment's frames) is cut into the DiT's patches (:func:`jdit.nn.injection.latent_tokens`), goes
through the projection + latent adapter once, and enters every block right after its temporal
attention through :class:`jdit.nn.injection.SemanticInjection` (the Latte ``after_temporal``
hook). The injection's gates start at zero, so at initialisation ``ArlonDiT`` computes exactly
what the DiT alone computes. Trainable: ``adapter`` and the hooks (:func:`trainable_mask`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from jdit.models.latte import Latte
from jdit.nn.injection import LatentAdapter, SemanticInjection, latent_tokens

Array = jax.Array

ADAPTER = "adapter"
HOOK = "hook"  # Latte's name for the after_temporal module in each block


def with_injection(dit: Latte) -> Latte:
    """The same DiT with a :class:`SemanticInjection` after each temporal attention."""
    if not isinstance(dit, Latte):
        raise ValueError(f"ARLON's injection needs a Latte video DiT (its after_temporal hook), "
                         f"got {type(dit).__name__}")
    return dit.clone(after_temporal=SemanticInjection, parent=None)


class ArlonDiT(nn.Module):
    """A video DiT (Latte with injection hooks) conditioned on a coarse latent per frame."""

    dit: Latte
    adapter_width: int = 64
    adapter_blocks: int = 2
    patch_size: int = 2

    def example_inputs(self, batch: int = 1, caption_length: int = 8,
                       frames: int | None = None) -> dict[str, Array]:
        inputs = self.dit.example_inputs(batch, caption_length, frames)
        return {**inputs, "coarse": jnp.zeros(inputs["x"].shape[:4] + (self.coarse_channels,))}

    @property
    def coarse_channels(self) -> int:
        """The coarse latent's channels: those of the latents the DiT denoises (a frame-
        conditioned DiT's input also carries its known frames and their mask)."""
        return self.dit.out_channels

    @nn.compact
    def __call__(self, x: Array, t: Array, context: Array, context_mask: Array | None = None,
                 coarse: Array | None = None) -> Array:
        if self.dit.after_temporal is None:
            raise ValueError("ArlonDiT.dit needs injection hooks: build it with with_injection")
        if coarse is None:
            raise ValueError("ArlonDiT needs the coarse latent (B, T, H, W, C) of its frames")
        if coarse.shape[:4] != x.shape[:4]:
            raise ValueError(f"coarse latent {coarse.shape} must cover the same frames and "
                             f"pixels (B, T, H, W) as x {x.shape}")
        feats = LatentAdapter(self.adapter_width, num_blocks=self.adapter_blocks,
                              name=ADAPTER)(latent_tokens(coarse, self.patch_size))
        per_block = jnp.broadcast_to(feats, (self.dit.depth, *feats.shape))
        return self.dit(x, t, context, context_mask, block_inputs=per_block)


def arlon_params(init: Any, dit_params: Any) -> Any:
    """``init`` (an :class:`ArlonDiT`'s fresh parameters) with the trained DiT's weights put in
    place: everything but the adapter and the hooks comes from ``dit_params``."""
    flat = traverse_util.flatten_dict(init)
    base = traverse_util.flatten_dict(dit_params)
    missing = [k for k in flat if not _trainable(k) and k[1:] not in base]
    unexpected = [k for k in base if ("dit", *k) not in flat]
    if missing or unexpected:
        raise ValueError(f"the DiT parameters do not fit this ArlonDiT: missing "
                         f"{['/'.join(k) for k in missing][:5]}, unexpected "
                         f"{['/'.join(k) for k in unexpected][:5]}")
    out = {k: (v if _trainable(k) else jnp.asarray(base[k[1:]], v.dtype))
           for k, v in flat.items()}
    return traverse_util.unflatten_dict(out)


def _trainable(path: tuple[str, ...]) -> bool:
    return path[0] == ADAPTER or HOOK in path


def trainable_mask(params: Any) -> Any:
    """True on the adapter's and the injections' parameters (ARLON trains these only)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: _trainable(k) for k in flat})
