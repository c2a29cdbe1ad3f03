"""Pallas kernels for jdit, each beside a pure-jnp reference with the same signature
(``pallas_kernels.reference``). TPU (Mosaic) first; ``interpret=True`` runs them anywhere."""

from pallas_kernels import reference
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.linear_attention import linear_attention

__all__ = ["flash_attention", "linear_attention", "reference"]
