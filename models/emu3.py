"""Emu3-Gen behind the adapter protocol (DESIGN.md section 6), through transformers 5.x.

Model: ``transformers.Emu3ForConditionalGeneration``. Backbone ``model.model.text_model``
(``Emu3TextModel``: ``inputs_embeds`` + ``past_key_values``), head ``model.lm_head``, input embeddings
``model.get_input_embeddings()`` (== the text model's ``embed_tokens``). The VQ-VAE is
``model.model.vqmodel``; images decode through ``model.model.decode_image_tokens(image_tokens=...,
height=..., width=...)`` (keyword arguments only: it takes ``[B, h * (w + 1) + 3]`` ids, drops the 3 tail
tokens and the EOL column, maps ids to codes by the ``<|visual token NNNNNN|>`` names of
``config.vocabulary_map``).

Vocabulary (names; the real ids in brackets): ``<|extra_203|>`` BOS (151849), ``<|extra_204|>`` EOS
(151850), ``<|endoftext|>`` pad (151643), ``<|extra_200|>`` end of line (151846), ``<|extra_201|>``
end of frame (151847), ``<|image token|>`` (151851), ``<|image start|>`` (151852), ``<|image end|>``
(151853), ``<|visual token 000000|>`` .. ``<|visual token 032767|>`` (151854..184621).

Prompt (``Emu3Processor(..., return_for_image_generation=True)``): BOS + text + ``<|image start|>`` +
"{h}*{w}" (codes per side) + ``<|image token|>``; at inference the text gets the positive suffix and the
CFG stream is the negative prompt in the same template, both left-padded.

Layout at 720 px (8 px per code): no head, 90 rows of (90 codes + EOL), then EOF, ``<|image end|>``, EOS
= 8193 tokens.

SJD2 timestep tokens (``reserved_ids``): ``<|extra_0|>`` .. ``<|extra_127|>`` (ids 151646..151773),
unused by Emu3 (it uses extra_200..extra_204 only).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import hf_common
from models.base import ImageLayout, Prefill, attach_sjd2_extras, left_pad
from models.hf_common import (
    CodeMappedAdapter,
    byte_level_tokenizer,
    config_from_mapping,
    load_tokenizer,
    read_checkpoint_config,
    resolve_checkpoint,
    torch_dtype,
)
from models.hf_loading import load_pretrained

BOS_NAME = "<|extra_203|>"
EOS_NAME = "<|extra_204|>"
PAD_NAME = "<|endoftext|>"
EOL_NAME = "<|extra_200|>"
EOF_NAME = "<|extra_201|>"
IMG_TOKEN_NAME = "<|image token|>"
IMG_START_NAME = "<|image start|>"
IMG_END_NAME = "<|image end|>"
RESERVED_NAMES = tuple(f"<|extra_{i}|>" for i in range(128))
N_VISUAL = 32768
VOCAB_SIZE = 184622
POSITIVE_SUFFIX = " masterpiece, film grained, best quality."
NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst "
    "quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)
CHECKPOINT_HINT = (
    "download the transformers-native Emu3-Gen checkpoint on a machine with internet, e.g. "
    "`huggingface-cli download BAAI/Emu3-Gen-hf --local-dir models/weights/emu3_gen`, and point model.path at "
    "that folder (config.json with model_type 'emu3', *.safetensors, tokenizer files; the remote-code "
    "BAAI/Emu3-Gen does not load in transformers 5.x); or set model.local_files_only=false to download it"
)


def parse_visual_name(name: str) -> int | None:
    """``<|visual token 001234|>`` -> 1234; None for other names."""
    m = re.fullmatch(r"<\|visual token (\d{6})\|>", name)
    return int(m.group(1)) if m else None


def visual_name(code: int) -> str:
    return f"<|visual token {int(code):06d}|>"


def _vocab_id(vocab: Mapping[str, int], name: str) -> int:
    return hf_common.vocab_id(vocab, name, "an Emu3")


def emu3_layout(vocab: Mapping[str, int], image_size: int, pixels_per_code: int, code_range: tuple[int, int]) -> ImageLayout:
    """Rows of codes each followed by EOL, then EOF, image end, EOS (no head tokens)."""
    if image_size < pixels_per_code or image_size % pixels_per_code:
        raise ValueError(
            f"impossible Emu3 image size {image_size}px: must be a positive multiple of {pixels_per_code}px "
            "(the VQ-VAE's spatial factor; 720 for Emu3-Gen)"
        )
    side = image_size // pixels_per_code
    return ImageLayout(
        height=side,
        width=side,
        head=(),
        eol=_vocab_id(vocab, EOL_NAME),
        tail=(_vocab_id(vocab, EOF_NAME), _vocab_id(vocab, IMG_END_NAME), _vocab_id(vocab, EOS_NAME)),
        code_start=code_range[0],
        code_stop=code_range[1],
    )


# ---------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class RandomSizes(hf_common.RandomSizes):
    """Sizes of a randomly initialised tiny Emu3: the language model's, 9216 positions, and its VQ-VAE's."""

    max_position_embeddings: int = 9216
    vq_base_channels: int = 32  # VQ-VAE width (Emu3: 256; GroupNorm needs a multiple of 32)
    vq_embed_dim: int = 4  # codebook vector size (Emu3: 4)
    vq_temporal_downsample_factor: int = 4  # Emu3: 4 (an image is repeated over 4 frames)


@dataclass(frozen=True)
class Emu3Config(hf_common.HFModelConfig):
    """``conf/model/emu3*.yaml`` (keys 1:1): the shared keys, then the prompt suffixes and pixel normalisation."""

    sizes_class = RandomSizes

    family: str = "emu3"
    name: str = "emu3_720"
    path: str | None = "BAAI/Emu3-Gen-hf"
    image_size: int = 720  # multiple of 8
    positive_suffix: str = POSITIVE_SUFFIX  # appended to every prompt at inference
    negative_prompt: str = NEGATIVE_PROMPT  # the CFG stream's text
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # VQ-VAE pixel normalisation ([-1, 1])
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))


# ---------------------------------------------------------------------------------------------------
# Tiny random configuration


def tiny_vocab_names(code_order: torch.Tensor | None = None) -> dict[int, str]:
    """id -> name for an Emu3-like vocabulary at the real ids (text bytes at 0..255).

    ``code_order`` [32768]: the code that id ``151854 + i`` spells (default identity; tests shuffle it).
    """
    order = torch.arange(N_VISUAL) if code_order is None else torch.as_tensor(code_order)
    names = {151643: PAD_NAME, 151644: "<|im_start|>", 151645: "<|im_end|>"}
    names.update({151646 + i: f"<|extra_{i}|>" for i in range(205)})
    names.update({151851: IMG_TOKEN_NAME, 151852: IMG_START_NAME, 151853: IMG_END_NAME})
    names.update({151854 + i: visual_name(c) for i, c in enumerate(order.tolist())})
    return names


def tiny_tokenizer(code_order: torch.Tensor | None = None):
    """A byte-level tokenizer with Emu3's special names at their real ids."""
    return byte_level_tokenizer(
        tiny_vocab_names(code_order), VOCAB_SIZE, text_base=0,
        special={"bos_token": BOS_NAME, "eos_token": EOS_NAME, "pad_token": PAD_NAME},
    )


def tiny_emu3(sizes: RandomSizes, vocab: Mapping[str, int]):
    """A randomly initialised ``Emu3ForConditionalGeneration`` (vocabulary_map = ``vocab``)."""
    from transformers import Emu3Config as HFEmu3Config
    from transformers import Emu3ForConditionalGeneration

    text = sizes.text_config(VOCAB_SIZE, vocab[BOS_NAME], vocab[EOS_NAME], vocab[PAD_NAME])
    vq = {  # channel_multiplier of 4 levels: 8 px per code, as Emu3's VQ-VAE
        "codebook_size": N_VISUAL, "embed_dim": sizes.vq_embed_dim, "latent_channels": sizes.vq_embed_dim,
        "base_channels": sizes.vq_base_channels, "channel_multiplier": [1, 1, 1, 1], "num_res_blocks": 1,
        "attn_resolutions": [], "hidden_size": sizes.vq_base_channels, "num_attention_heads": 1,
        "temporal_downsample_factor": sizes.vq_temporal_downsample_factor,
    }
    config = HFEmu3Config(text_config=text, vq_config=vq, vocabulary_map=dict(vocab))
    return Emu3ForConditionalGeneration(config)


# ---------------------------------------------------------------------------------------------------
# Adapter


class Emu3Adapter(CodeMappedAdapter):
    """Emu3-Gen through ``Emu3ForConditionalGeneration`` (its own VQ-VAE)."""

    def __init__(self, model: Any, tokenizer: Any, cfg: Emu3Config):
        vocab = self._setup(model, model.model.text_model, tokenizer, cfg, parse_visual_name)  # Emu3TextModel
        self.pixels_per_code = int(model.model.vqmodel.vision_spatial_factor)
        self.layout = emu3_layout(vocab, self.image_size, self.pixels_per_code, self.code_map.id_range())
        self.ids = {k: _vocab_id(vocab, n) for k, n in (
            ("bos", BOS_NAME), ("pad", PAD_NAME), ("img_start", IMG_START_NAME), ("img_token", IMG_TOKEN_NAME))}
        self._reserved = tuple(_vocab_id(vocab, n) for n in RESERVED_NAMES)
        self._check_vocabulary_map(model.config.vocabulary_map)
        codebook = int(model.config.vq_config.codebook_size)
        if codebook != self.code_map.n_codes:
            raise ValueError(f"the VQ-VAE's codebook has {codebook} codes but the vocabulary names {self.code_map.n_codes} "
                             "visual tokens; the config and the tokenizer come from different checkpoints")
        self._check_positions()

    def _check_vocabulary_map(self, vocabulary_map: Mapping[str, int] | None) -> None:
        """decode_image_tokens maps ids by the config's names: they must agree with the tokenizer's."""
        if not vocabulary_map:
            raise ValueError("the Emu3 config has no vocabulary_map; decode_image_tokens cannot map visual tokens")
        probe = [0, 1, self.code_map.n_codes - 1]
        for c in probe:
            if vocabulary_map.get(visual_name(c)) != int(self.code_map.bpe_of_code[c]):
                raise ValueError(f"config.vocabulary_map and the tokenizer disagree on {visual_name(c)}")

    # -- prompt ------------------------------------------------------------------------------------
    def prompt_ids(self, text: str) -> list[int]:
        """BOS + text + ``<|image start|>`` + "{h}*{w}" + ``<|image token|>`` (no suffix, no padding)."""
        size = f"{self.layout.height}*{self.layout.width}"
        return (
            [self.ids["bos"]] + list(self.tokenizer.encode(text, add_special_tokens=False))
            + [self.ids["img_start"]] + list(self.tokenizer.encode(size, add_special_tokens=False))
            + [self.ids["img_token"]]
        )

    def prompt(self, text: str, cfg: bool = True) -> Prefill:
        """Row 0: text + positive suffix; row 1 (CFG): the negative prompt; left-padded."""
        rows = [self.prompt_ids(text + self.cfg.positive_suffix)]
        if cfg:
            rows.append(self.prompt_ids(self.cfg.negative_prompt))
        return left_pad(rows, self.ids["pad"])

    @property
    def reserved_ids(self) -> tuple[int, ...]:
        return self._reserved

    # -- image codec -------------------------------------------------------------------------------
    def decode_image(self, tokens: torch.Tensor):
        """Full image sequence [n_tokens] -> PIL image through ``decode_image_tokens``."""
        from PIL import Image

        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()
        self.image_codes(tokens)  # refuses non-code ids with a clear error
        bad = self.layout.violations(tokens)
        if bad:
            raise ValueError(f"the sequence breaks the Emu3 layout at positions {bad[:5]}")
        pixels = self.model.model.decode_image_tokens(
            image_tokens=tokens[None].to(self.device), height=self.layout.height, width=self.layout.width
        )  # [1, 3, H, W], normalised
        mean = torch.tensor(self.cfg.image_mean).view(3, 1, 1)
        std = torch.tensor(self.cfg.image_std).view(3, 1, 1)
        rgb = (pixels[0].float().cpu() * std + mean).clamp(0, 1)
        arr = (rgb * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")

    @torch.no_grad()
    def encode_image(self, image: Any) -> torch.Tensor:
        """PIL image of exactly ``image_size`` px -> full image sequence [n_tokens] (VQ-VAE encoder)."""
        if tuple(image.size) != (self.image_size, self.image_size):
            raise ValueError(
                f"encode_image needs a {self.image_size}x{self.image_size} image, got {image.size[0]}x{image.size[1]}; "
                "resize/center-crop first (train.data.fit_image)"
            )
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
        mean, std = np.asarray(self.cfg.image_mean, np.float32), np.asarray(self.cfg.image_std, np.float32)
        pixels = torch.from_numpy((arr - mean) / std).permute(2, 0, 1)[None]  # [1, 3, H, W]
        vq = self.model.model.vqmodel
        out = vq.encode(pixels.to(self.device, vq.dtype), torch.tensor([[self.image_size, self.image_size]]))
        codes = out.image_tokens[0].cpu()  # [h, w]
        return self.layout.sequence(self.code_map.to_ids(codes))


def build_random(cfg: Emu3Config, code_order: torch.Tensor | None = None) -> Emu3Adapter:
    """Tiny randomly initialised Emu3 with a tokenizer built in code (seeded)."""
    sizes = cfg.random_sizes or RandomSizes()
    tokenizer = tiny_tokenizer(code_order)
    torch.manual_seed(cfg.seed)
    model = tiny_emu3(sizes, tokenizer.get_vocab())
    model.to(device=cfg.device, dtype=torch_dtype(cfg.dtype))
    return Emu3Adapter(model, tokenizer, cfg)


def _processor_normalisation(ckpt: Path, cfg: Emu3Config) -> Emu3Config:
    """Take image_mean/std from the checkpoint's preprocessor_config.json when it has them."""
    from dataclasses import replace

    pre = ckpt / "preprocessor_config.json"
    if not pre.is_file():
        return cfg
    raw = json.loads(pre.read_text())
    if "image_mean" in raw and "image_std" in raw:
        return replace(cfg, image_mean=tuple(raw["image_mean"]), image_std=tuple(raw["image_std"]))
    return cfg


def load(cfg: Emu3Config) -> Emu3Adapter:
    """Real weights from a checkpoint folder (or cached hub id); never downloads by default."""
    from transformers import Emu3ForConditionalGeneration

    ckpt = resolve_checkpoint(cfg.path, cfg.local_files_only, CHECKPOINT_HINT)
    read_checkpoint_config(ckpt, "emu3", CHECKPOINT_HINT)
    model = load_pretrained(Emu3ForConditionalGeneration, ckpt, torch_dtype(cfg.dtype), CHECKPOINT_HINT).to(cfg.device)
    tokenizer = load_tokenizer(ckpt, CHECKPOINT_HINT, config=model.config)
    return attach_sjd2_extras(Emu3Adapter(model, tokenizer, _processor_normalisation(ckpt, cfg)), ckpt)


def load_from_config(cfg: Mapping[str, Any]) -> Emu3Adapter:
    """``conf/model/emu3*.yaml`` -> adapter (``random_init: true``: tiny model built in code)."""
    config = config_from_mapping(Emu3Config, cfg)
    return build_random(config) if config.random_init else load(config)


__all__ = [
    "Emu3Adapter", "Emu3Config", "RandomSizes", "build_random", "emu3_layout", "load", "load_from_config",
    "parse_visual_name", "visual_name",
]
