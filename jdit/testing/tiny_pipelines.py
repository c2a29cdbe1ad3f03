"""Small random diffusers pipelines saved to a folder: what the pipeline parity tests, the
notebooks' offline mode and ``jdit bench pipeline`` load, since no weights can be downloaded.

Built with torch, diffusers and transformers (the ``test`` extra): a sentencepiece tokenizer
trained on the spot, a random T5 v1.1 encoder, a random PixArt (or DiT) transformer, a random
AutoencoderKL and the default DPM-Solver++ scheduler. Weights are perturbed so no layer is left
at its zero or identity initialisation.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

WORDS = ("a an the of in on and with red green blue yellow small big happy cactus desert cat "
         "dog horse astronaut moon photo painting circle square triangle top bottom left right "
         "middle sky forest snowy fox cup coffee table wooden").split()


def train_tokenizer(folder: Path, vocab_size: int = 64, seed: int = 0) -> Path:
    """A T5-style sentencepiece unigram model (pad 0, eos 1, unk 2) at ``folder/spiece.model``."""
    import sentencepiece as spm

    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.choice(WORDS, 8)) for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                   vocab_size=vocab_size, model_type="unigram", pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder / "spiece.model"


def _perturb(module: Any, seed: int, std: float = 0.05) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return module.eval()


def vae(seed: int = 2, levels: int = 2) -> Any:
    from diffusers import AutoencoderKL

    channels = (8, 16, 16, 16)[:levels]
    return _perturb(AutoencoderKL(
        block_out_channels=channels, layers_per_block=1, norm_num_groups=4, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, sample_size=32), seed)


def text_to_image(folder: str | Path, kind: str = "sigma", sample_size: int = 32,
                  width: int = 16, seed: int = 0, controlnet_layers: int = 0) -> Any:
    """A ``PixArtSigmaPipeline`` (``kind="sigma"``) or ``PixArtAlphaPipeline`` (``"alpha"``;
    micro-conditions when ``sample_size`` is 128, as PixArt-α 1024) saved at ``folder``;
    returns the diffusers pipeline. The VAE downsamples 8× like the real ones, so
    ``sample_size`` 32 is a "256 px" model with PixArt's 256 aspect-ratio bins.

    ``controlnet_layers`` > 0 (α): a ``PixArtAlphaControlnetPipeline`` folder as diffusers'
    research project writes it (examples/research_projects/pixart: model_index.json naming
    that class, controlnet/ a ``PixArtControlNetAdapterModel``) with random copies of the
    first blocks, their projections random too; returns ``(pipeline, controlnet state dict)``:
    the diffusers pipeline of the base, and the ControlNet's weights (diffusers names)."""
    import torch
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    train_tokenizer(folder / "_spm", seed=seed)
    tokenizer = T5Tokenizer.from_pretrained(str(folder / "_spm"))
    encoder = _perturb(T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        relative_attention_max_distance=16)), seed)
    heads = 2
    transformer = _perturb(PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=2 + controlnet_layers, num_attention_heads=heads,
        attention_head_dim=width // heads, in_channels=4, out_channels=8, caption_channels=32,
        cross_attention_dim=width, use_additional_conditions=sample_size == 128), seed + 1)
    cls = PixArtSigmaPipeline if kind == "sigma" else PixArtAlphaPipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=encoder, vae=vae(seed + 2, levels=4),
               transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(folder)
    if not controlnet_layers:
        return pipe
    if kind != "alpha":
        raise ValueError("a PixArt-δ ControlNet pipeline is PixArt-α's (kind='alpha')")
    return pipe, _pixart_controlnet(folder, transformer, controlnet_layers, seed + 3)


def _pixart_controlnet(folder: Path, transformer: Any, layers: int, seed: int) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    d = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    sd: dict[str, Any] = {}
    for i in range(layers):  # copies of the base's blocks, perturbed
        for k, v in transformer.transformer_blocks[i].state_dict().items():
            sd[f"controlnet_blocks.{i}.transformer_block.{k}"] = (
                v + 0.05 * torch.randn(v.shape, generator=gen))
        for wb, shape in (("weight", (d, d)), ("bias", (d,))):
            sd[f"controlnet_blocks.{i}.after_proj.{wb}"] = 0.05 * torch.randn(shape, generator=gen)
            if i == 0:
                sd[f"controlnet_blocks.0.before_proj.{wb}"] = 0.05 * torch.randn(shape,
                                                                                 generator=gen)
    (folder / "controlnet").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()},
              folder / "controlnet" / "diffusion_pytorch_model.safetensors")
    (folder / "controlnet" / "config.json").write_text(json.dumps(
        {"_class_name": "PixArtControlNetAdapterModel", "num_layers": layers}))
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "PixArtAlphaControlnetPipeline"
    index["controlnet"] = ["controlnet_pixart_alpha", "PixArtControlNetAdapterModel"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return sd


def gemma_tokenizer(folder: Path, vocab_size: int = 320, seed: int = 0) -> Any:
    """A Gemma-style tokenizer (sentencepiece BPE with byte fallback; <pad> 0, <eos> 1, <bos> 2,
    <unk> 3) as transformers' ``GemmaTokenizer``, trained on the spot; right padding, as
    SANA uses it."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.choice(WORDS, 8)) for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", byte_fallback=True,
        hard_vocab_limit=False, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = GemmaTokenizer.from_pretrained(str(folder), add_bos_token=True)
    tokenizer.padding_side = "right"
    return tokenizer


def byte_level_tokenizer(folder: Path, style: str = "llama", vocab_size: int = 300,
                         seed: int = 0) -> Any:
    """A byte-level BPE ``tokenizer.json`` trained on the spot, saved at ``folder`` and returned
    as transformers loads it: ``style="llama"`` (Llama-3's: ``<|begin_of_text|>`` first, no pad
    token) or ``"qwen2"`` (Qwen2's: no special tokens added, ``<|endoftext|>`` pads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    if style not in ("llama", "qwen2"):
        raise ValueError(f"style must be 'llama' or 'qwen2', got {style!r}")
    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.choice(WORDS, 8)) for _ in range(500)]
    specials = (["<|begin_of_text|>", "<|end_of_text|>"] if style == "llama"
                else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sentences, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if style == "llama":
        bos = (specials[0], tok.token_to_id(specials[0]))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos])
        config = {"bos_token": specials[0], "eos_token": specials[1]}
    else:
        config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    reference = AutoTokenizer.from_pretrained(str(folder))
    if reference.pad_token is None:
        reference.pad_token = reference.eos_token
    reference.padding_side = "right"
    return reference


def sana(folder: str | Path, sample_size: int = 8, width: int = 32, seed: int = 0,
         controlnet_layers: int = 0, sprint: bool = False) -> Any:
    """A ``SanaPipeline`` saved at ``folder``: a random Gemma-2 encoder (sliding and global
    layers), a random SANA transformer, a random DC-AE (4× down, 8 latent channels, a ViT
    stage) and SANA's flow DPM-Solver++ scheduler; returns the diffusers pipeline.
    ``controlnet_layers`` > 0: a ``SanaControlNetPipeline`` with a random ControlNet of that
    many blocks. ``sprint``: a ``SanaSprintPipeline`` (the transformer embeds the guidance
    scale and normalises q and k, as SANA-Sprint's; ``SCMScheduler``)."""
    import torch
    from diffusers import (
        AutoencoderDC,
        DPMSolverMultistepScheduler,
        SanaPipeline,
        SanaTransformer2DModel,
    )
    from transformers import Gemma2Config, Gemma2Model

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = gemma_tokenizer(folder / "_spm", seed=seed)
    encoder = _perturb(Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
        pad_token_id=0, eos_token_id=1, bos_token_id=2)), seed)
    latent = 8
    shared = dict(
        in_channels=latent, out_channels=latent, num_attention_heads=width // 16,
        attention_head_dim=16, num_cross_attention_heads=2,
        cross_attention_head_dim=width // 2, cross_attention_dim=width, caption_channels=32,
        mlp_ratio=2.5, sample_size=sample_size, patch_size=1)
    sprint_fields = dict(guidance_embeds=True, qk_norm="rms_norm_across_heads") if sprint else {}
    transformer = _perturb(SanaTransformer2DModel(num_layers=3 if controlnet_layers else 2,
                                                  **shared, **sprint_fields), seed + 1)
    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")
    vae = _perturb(AutoencoderDC(
        in_channels=3, latent_channels=latent, attention_head_dim=8,
        encoder_block_types=blocks, decoder_block_types=blocks,
        encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        upsample_block_type="interpolate", downsample_block_type="Conv",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407), seed + 2)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=3.0)
    if sprint:
        from diffusers import SanaSprintPipeline, SCMScheduler

        pipe = SanaSprintPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae,
                                  transformer=transformer, scheduler=SCMScheduler())
    elif controlnet_layers:
        from diffusers import SanaControlNetModel, SanaControlNetPipeline

        controlnet = _perturb(SanaControlNetModel(num_layers=controlnet_layers, **shared), seed + 3)
        pipe = SanaControlNetPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae,
                                      transformer=transformer, controlnet=controlnet,
                                      scheduler=scheduler)
    else:
        pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae,
                            transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return pipe


def lumina2(folder: str | Path, sample_size: int = 16, seed: int = 0) -> Any:
    """A ``Lumina2Pipeline`` saved at ``folder``: a random Gemma-2 encoder, a random Lumina-Image
    2.0 transformer (3-D rotary positions, refiners, GQA), a random AutoencoderKL with a FLUX-like
    scale and shift, and a statically shifted flow Euler scheduler (shift 6, as published);
    returns the diffusers pipeline."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline
    from diffusers import Lumina2Transformer2DModel as Lumina2
    from transformers import Gemma2Config, Gemma2Model

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = gemma_tokenizer(folder / "_spm", seed=seed)
    encoder = _perturb(Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
        pad_token_id=0, eos_token_id=1, bos_token_id=2)), seed)
    transformer = _perturb(Lumina2(
        sample_size=sample_size, patch_size=2, in_channels=4, hidden_size=48, num_layers=2,
        num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2, multiple_of=16,
        axes_dim_rope=(4, 4, 4), axes_lens=(300, 64, 64), cap_feat_dim=32), seed + 1)
    autoencoder = vae(seed + 2)
    autoencoder.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)
    pipe = Lumina2Pipeline(transformer=transformer, vae=autoencoder, text_encoder=encoder,
                           tokenizer=tokenizer,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0))
    pipe.save_pretrained(folder)
    return pipe


def class_to_image(folder: str | Path, seed: int = 0, num_classes: int = 1000) -> Any:
    """A ``DiTPipeline`` (learned sigma) saved at ``folder``; diffusers hard-codes the null
    class id 1000, so ``num_classes`` stays 1000 for a parity comparison."""
    import torch
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(seed)
    transformer = _perturb(DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes), seed + 1)
    # diffusers keeps a copy of the timestep and class embedders in every block; converted DiT
    # checkpoints hold identical copies (the original model has one), so keep them identical
    first = transformer.transformer_blocks[0].norm1.emb.state_dict()
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    pipe = DiTPipeline(transformer=transformer, vae=vae(seed + 2),
                       scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(folder)
    return pipe
