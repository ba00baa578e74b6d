"""An Emu3-Gen checkpoint folder in the published (``BAAI/Emu3-Gen-hf``) layout, random weights, any size
(provenance of every name and value: :mod:`bench.published`)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.published import (
    EMU3_8B,
    MAX_SHARD_BYTES,
    LmSizes,
    build_vocab,
    lm_specs,
    random_tensors,
    tokenizer_json,
    write_json,
    write_shards,
)
from models.emu3 import (
    BOS_NAME,
    EOS_NAME,
    IMG_END_NAME,
    IMG_START_NAME,
    IMG_TOKEN_NAME,
    N_VISUAL,
    PAD_NAME,
    VOCAB_SIZE,
    visual_name,
)

N_TEXT = 151643  # Qwen byte-level BPE ids before <|endoftext|>
REAL_VQ = {  # transformers' Emu3VQVAEConfig defaults (= BAAI/Emu3-VisionTokenizer)
    "codebook_size": N_VISUAL, "embed_dim": 4, "latent_channels": 4, "double_latent": False, "in_channels": 3,
    "out_channels": 3, "temporal_downsample_factor": 4, "base_channels": 256, "channel_multiplier": [1, 2, 2, 4],
    "num_res_blocks": 2, "attn_resolutions": [3], "hidden_size": 1024, "num_attention_heads": 1,
    "attention_dropout": 0.0,
}


def special_names() -> dict[int, str]:
    """id -> name of every special token at Emu3's real ids (the tiktoken special tokens of the conversion)."""
    names = {151643: PAD_NAME, 151644: "<|im_start|>", 151645: "<|im_end|>"}
    names.update({151646 + i: f"<|extra_{i}|>" for i in range(205)})
    names.update({151851: IMG_TOKEN_NAME, 151852: IMG_START_NAME, 151853: IMG_END_NAME})
    names.update({151854 + c: visual_name(c) for c in range(N_VISUAL)})
    return names


def write_tokenizer(out: Path) -> dict[str, int]:
    """The files ``convert_tiktoken`` writes; returns the vocabulary (== ``config.vocabulary_map``)."""
    fixed = special_names()
    vocab, merges = build_vocab(fixed, VOCAB_SIZE, 0, lambda i: f"<|qwen_text_{i}|>")
    specials = {name: i for i, name in fixed.items()}
    write_json(out / "tokenizer.json", tokenizer_json(vocab, merges, specials))
    write_json(out / "vocab.json", vocab)
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges))
    special_map = {"bos_token": BOS_NAME, "eos_token": EOS_NAME, "pad_token": PAD_NAME}
    write_json(out / "special_tokens_map.json", special_map)
    write_json(out / "tokenizer_config.json", {**special_map, "add_prefix_space": False,
                                               "clean_up_tokenization_spaces": False, "tokenizer_class": "GPT2Tokenizer"})
    write_json(out / "preprocessor_config.json", {
        "image_processor_type": "Emu3ImageProcessor", "do_convert_rgb": True, "do_resize": True, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "min_pixels": 512 * 512, "max_pixels": 1024 * 1024, "spatial_factor": 8,
        "do_pad": True})
    return vocab


def vq_tensors(vq_config: dict, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """``vqmodel.*``: the VQ-VAE's own initialisation (sane pixels when decoding random codes), bf16."""
    from transformers.models.emu3.configuration_emu3 import Emu3VQVAEConfig
    from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

    torch.manual_seed(seed + 1)
    vq = Emu3VQVAE(Emu3VQVAEConfig(**vq_config))
    for key, value in vq.state_dict().items():
        yield f"vqmodel.{key}", value.to(torch.bfloat16) if value.is_floating_point() else value


def write_emu3(out: str | Path, sizes: LmSizes = EMU3_8B, vq_config: dict[str, Any] | None = None, seed: int = 0,
               max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """The ``BAAI/Emu3-Gen-hf`` folder layout at ``sizes`` (bf16 shards with the 4.48 key names, index,
    config with the full vocabulary map, tokenizer and preprocessor files)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vq_config = dict(REAL_VQ if vq_config is None else vq_config)
    vocab = write_tokenizer(out)
    text = {
        "model_type": "emu3_text_model", "vocab_size": VOCAB_SIZE, "hidden_size": sizes.hidden_size,
        "intermediate_size": sizes.intermediate_size, "num_hidden_layers": sizes.num_hidden_layers,
        "num_attention_heads": sizes.num_attention_heads, "num_key_value_heads": sizes.num_key_value_heads,
        "hidden_act": "silu", "max_position_embeddings": sizes.max_position_embeddings, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "rope_scaling": {"rope_type": "default"}, "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.1, "initializer_range": 0.02, "use_cache": True,
        "pad_token_id": vocab[PAD_NAME], "bos_token_id": vocab[BOS_NAME], "eos_token_id": vocab[EOS_NAME],
        "tie_word_embeddings": False,
    }
    config = {"architectures": ["Emu3ForConditionalGeneration"], "model_type": "emu3", "text_config": text,
              "vq_config": {"model_type": "emu3_vqgan", **vq_config}, "vocabulary_map": vocab,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.48.0.dev0"}
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", {"bos_token_id": vocab[BOS_NAME], "eos_token_id": vocab[EOS_NAME],
                                                "pad_token_id": vocab[PAD_NAME], "transformers_version": "4.48.0.dev0"})

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        yield from random_tensors(lm_specs("text_model.model", "text_model.lm_head.weight", sizes, VOCAB_SIZE, None),
                                  seed, torch.bfloat16)
        yield from vq_tensors(vq_config, seed)

    write_shards(out, tensors(), max_shard_bytes)
    return out


__all__ = ["REAL_VQ", "special_names", "write_emu3"]
