"""A Lumina-mGPT checkpoint folder and Meta's VQGAN folder in the published layout, random weights, any
size (provenance of every name and value: :mod:`bench.published`)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from bench.published import (
    LUMINA_7B,
    MAX_SHARD_BYTES,
    LmSizes,
    build_vocab,
    lm_specs,
    random_tensors,
    tokenizer_json,
    write_json,
    write_shards,
)
from models.chameleon_vqgan import ChameleonVQGAN, VQGANConfig
from models.lumina_mgpt import BOS_NAME, EOT_NAME, IMG_END_NAME, IMG_START_NAME, PAD_NAME, code_name

META_VQGAN = VQGANConfig()  # Meta's vqgan.yaml values (the dataclass defaults)
VOCAB_SIZE = 65536
N_CODES = 8192
TEXT_BASE = 9000  # our synthetic text tokens (bytes + template merges) start here
RESERVED_STOP = 9000  # <reservedNNNNN> names (NNNNN = id - 4) fill ids 8198 .. 8999


def vocab_names() -> dict[int, str]:
    """id -> name at Chameleon's real ids: <s> <pad> </s> <unk>, image codes 4..8195 in name order (the
    sorted ``IMGIMG<letters>Z`` strings, so id order is not code order), <eoss>, <racm3:break>, the
    reserved names with ``<reserved08707>`` renamed ``<image>`` (the HF conversion)."""
    names = {0: BOS_NAME, 1: PAD_NAME, 2: "</s>", 3: "<unk>", 8196: IMG_END_NAME, 8197: IMG_START_NAME}
    for i, name in enumerate(sorted(code_name(c) for c in range(N_CODES))):
        names[4 + i] = name
    for i in range(8198, RESERVED_STOP):
        names[i] = f"<reserved{i - 4:05d}>"
    names[8711] = "<image>"
    return names


def write_tokenizer(out: Path) -> dict[str, int]:
    """tokenizer.json / tokenizer_config.json / special_tokens_map.json; returns the vocabulary."""
    fixed = vocab_names()
    vocab, merges = build_vocab(fixed, VOCAB_SIZE, TEXT_BASE, lambda i: f"<|lumina_text_{i}|>")
    specials = {name: i for i, name in fixed.items() if not name.startswith("IMGIMG")}
    write_json(out / "tokenizer.json", tokenizer_json(vocab, merges, specials))
    special_map = {"bos_token": BOS_NAME, "eos_token": "</s>", "pad_token": PAD_NAME, "unk_token": "<unk>",
                   "sep_token": EOT_NAME}
    write_json(out / "special_tokens_map.json", special_map)
    write_json(out / "tokenizer_config.json", {
        **special_map, "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "legacy": False, "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
        "added_tokens_decoder": {str(i): {"content": n, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for n, i in specials.items()},
    })
    return vocab


def vq_config_entry(vq: VQGANConfig) -> dict:
    """``config.json``'s ``vq_config``: Meta's yaml params plus the renamed copies the conversion adds."""
    raw = asdict(vq)
    raw.pop("norm_groups")
    raw.update({"base_channels": vq.ch, "out_channels": vq.out_ch, "num_embeddings": vq.n_embed,
                "channel_multiplier": list(vq.ch_mult), "double_latent": vq.double_z, "latent_channels": vq.z_channels,
                "ch_mult": list(vq.ch_mult), "attn_resolutions": list(vq.attn_resolutions)})
    return raw


def write_lumina(out: str | Path, sizes: LmSizes = LUMINA_7B, vq: VQGANConfig = META_VQGAN, seed: int = 0,
                 max_shard_bytes: int = MAX_SHARD_BYTES, qk_norm_rows: int = 1) -> Path:
    """The ``Alpha-VLLM/Lumina-mGPT-7B-768`` folder layout at ``sizes`` (bf16 shards, index, config,
    tokenizer files). ``vq``: the ``vq_config`` entry of config.json (transformers builds its encoder-only
    Chameleon VQ from it; the image codec itself is :func:`write_vqgan`'s folder). ``qk_norm_rows``: 1 as Lumina stores it; ``num_attention_heads`` as transformers 5.x
    saves it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(out)
    config = {
        "architectures": ["ChameleonXLLMXForConditionalGeneration"], "model_type": "chameleon",
        "attention_bias": False, "attention_dropout": 0.0, "dropout": 0.05, "hidden_act": "silu",
        "hidden_size": sizes.hidden_size, "intermediate_size": sizes.intermediate_size,
        "num_hidden_layers": sizes.num_hidden_layers, "num_attention_heads": sizes.num_attention_heads,
        "num_key_value_heads": sizes.num_key_value_heads, "max_position_embeddings": sizes.max_position_embeddings,
        "initializer_range": 0.02, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
        "mlp_bias": False, "model_parallel_size": 1, "swin_norm": False, "mask_image_logits": False,
        "z_loss_weight": 1e-05, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": vocab[BOS_NAME], "eos_token_id": vocab["</s>"], "pad_token_id": vocab[PAD_NAME],
        "vocab_size": VOCAB_SIZE, "vq_config": vq_config_entry(vq), "vocabulary_map": vocab,
        "torch_dtype": "bfloat16", "transformers_version": "4.44.0",
    }
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", {"bos_token_id": vocab[BOS_NAME], "eos_token_id": vocab["</s>"],
                                                "pad_token_id": vocab[PAD_NAME], "transformers_version": "4.44.0"})
    specs = lm_specs("model", "lm_head.weight", sizes, VOCAB_SIZE, qk_norm_rows)
    write_shards(out, random_tensors(specs, seed, torch.bfloat16), max_shard_bytes)
    return out


def vqgan_yaml(vq: VQGANConfig) -> dict:
    """Meta's ``vqgan.yaml`` structure (taming-transformers ``VQModel`` params)."""
    dd = {"double_z": vq.double_z, "z_channels": vq.z_channels, "resolution": vq.resolution,
          "in_channels": vq.in_channels, "out_ch": vq.out_ch, "ch": vq.ch, "ch_mult": list(vq.ch_mult),
          "num_res_blocks": vq.num_res_blocks, "attn_resolutions": list(vq.attn_resolutions), "dropout": vq.dropout}
    if vq.attn_type != "vanilla":
        dd["attn_type"] = vq.attn_type
    if vq.norm_groups != 32:
        dd["norm_groups"] = vq.norm_groups  # our tiny test widths only; Meta's file has no such key
    return {"model": {"base_learning_rate": 4.5e-06, "target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": vq.embed_dim, "n_embed": vq.n_embed, "ddconfig": dd,
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 0}}}}}


def write_vqgan(out: str | Path, vq: VQGANConfig = META_VQGAN, seed: int = 0) -> Path:
    """``vqgan.yaml`` + ``vqgan.ckpt`` (float32 Lightning checkpoint with ``loss.*`` entries) in ``out``."""
    import yaml

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vqgan.yaml").write_text(yaml.safe_dump(vqgan_yaml(vq), sort_keys=False))
    torch.manual_seed(seed)
    state = ChameleonVQGAN(vq).state_dict()
    state["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)  # the training loss's modules
    state["loss.logvar"] = torch.zeros(())
    torch.save({"epoch": 0, "global_step": 0, "state_dict": state}, out / "vqgan.ckpt")
    return out


__all__ = ["VOCAB_SIZE", "vocab_names", "write_lumina", "write_vqgan"]
