"""Shared layers: the building blocks every jdit model is composed from."""

from jdit.nn.attention import (
    ATTENTION_IMPLS,
    KV_COMPRESS_MODES,
    CrossAttention,
    KVCompress,
    SelfAttention,
    compressed_length,
    dot_product_attention,
    register_attention_impl,
    xla_attention,
)
from jdit.nn.embeddings import (
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    sincos_pos_embed_2d,
    sincos_pos_embed_factors,
    timestep_sinusoid,
    unpatchify,
)
from jdit.nn.init import abstract_params, init_params, perturbed
from jdit.nn.layers import LOGICAL_AXES, AffineLayerNorm, Dense, Mlp, RMSNorm, layer_norm, modulate
from jdit.nn.linear_attention import LinearSelfAttention, linear_attention
from jdit.nn.mix_ffn import DepthwiseConv, MixFFN
from jdit.nn.modulation import AdaLNModulation, FinalLayer, scale_shift_table
from jdit.nn.rotary import apply_rotary_interleaved, rotary_cos_sin
from jdit.nn.stack import REMAT_POLICIES, run_blocks, stack_params, unstack_params
from jdit.nn.text_refiner import (
    TextRefiner,
    TextRefinerConfig,
    TokenRefiner,
    pack_contexts,
)

__all__ = [
    "ATTENTION_IMPLS", "KV_COMPRESS_MODES", "LOGICAL_AXES", "REMAT_POLICIES",
    "AdaLNModulation", "abstract_params", "apply_rotary_interleaved", "rotary_cos_sin", "init_params", "perturbed", "AffineLayerNorm", "CrossAttention", "Dense", "DepthwiseConv",
    "FinalLayer", "KVCompress", "LabelEmbedder", "LinearSelfAttention", "Mlp", "MixFFN",
    "PatchEmbed", "RMSNorm", "SelfAttention", "TextRefiner", "TextRefinerConfig",
    "TimestepEmbedder", "TokenRefiner", "pack_contexts",
    "compressed_length", "dot_product_attention", "layer_norm", "linear_attention", "modulate",
    "register_attention_impl", "run_blocks", "scale_shift_table", "sincos_pos_embed_2d",
    "sincos_pos_embed_factors", "stack_params", "timestep_sinusoid", "unpatchify",
    "unstack_params", "xla_attention",
]
