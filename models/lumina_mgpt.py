"""Lumina-mGPT (Chameleon architecture) behind the adapter protocol (DESIGN.md section 6).

Model: ``transformers.ChameleonForConditionalGeneration``. Its ``forward`` sets every image-code logit
to the dtype minimum, so the adapter calls the backbone (``model.model``) and ``lm_head`` directly.

Vocabulary (Chameleon tokenizer; every id is looked up by *name*, never by offset):

* image codes: names ``IMGIMG<letters>Z`` where the letters A..J spell the decimal digits of the
  VQGAN code (``IMGIMGBCZ`` is code 12); ids 4..8195 in the real vocabulary, in name order that is
  not code order,
* ``<racm3:break>`` image start (8197), ``<eoss>`` image end (8196), ``<reserved08799>`` end of line
  (8803), ``<reserved{8800+n:05d}>`` the resolution token of a side of ``n * 32`` pixels (8804 + n),
  ``<reserved08706>`` end of turn (8710), ``<s>`` BOS (0).

Layout (``lumina_mgpt/data/item_processor.py``): ``[<racm3:break>, res(h), res(w)]``, ``h/16`` rows of
``w/16`` codes + ``<reserved08799>``, then ``<eoss>``, ``<reserved08706>``: 2357 tokens at 768 px. The
original lets the model sample the two resolution tokens; here the layout forces them from
``image_size`` (the prompt names the same size, so a trained model puts its mass there anyway).

Prompt (``Conversation`` + ``FlexARItemProcessor``): ``<s>`` + "Generate an image of {W}x{H} according
to the following prompt:\\n" + caption + ``<reserved08706>``. CFG: the unconditional stream is the
same ids with every prompt position masked out except the last (the SJD reference code).

SJD2 timestep tokens (``reserved_ids``): ``<reserved08300>`` .. ``<reserved08427>`` (ids 8304..8431),
128 reserved names between ``<racm3:break>`` and the tokens Lumina-mGPT uses (end of turn 08706,
``<image>`` 08707, separators 08796..08799, resolution tokens 08800+n); no Lumina-mGPT data holds them.

Image codec: Meta's Chameleon VQGAN (:mod:`models.chameleon_vqgan`), files in ``vq_path``.

The pieces both HF adapters use (checkpoint lookup, the name-based code map, a byte-level tokenizer
for tiny random configs) live in :mod:`models.hf_common`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import hf_common
from models.base import ImageLayout, Prefill, attach_sjd2_extras
from models.chameleon_vqgan import (
    VQ_HINT,
    ChameleonVQGAN,
    VQGANConfig,
    load_vqgan,
    pil_to_pixels,
    pixels_to_pil,
)
from models.hf_common import (
    CodeMap,
    CodeMappedAdapter,
    byte_level_tokenizer,
    config_from_mapping,
    load_tokenizer,
    read_checkpoint_config,
    resolve_checkpoint,
    torch_dtype,
)
from models.hf_loading import expand_qk_norm, load_pretrained, register_qk_norm_expansion

# ---------------------------------------------------------------------------------------------------
# Lumina-mGPT vocabulary, layout and prompt

BOS_NAME = "<s>"
PAD_NAME = "<pad>"
IMG_START_NAME = "<racm3:break>"
IMG_END_NAME = "<eoss>"
EOL_NAME = "<reserved08799>"
EOT_NAME = "<reserved08706>"  # end of turn == EOS of image generation
RESERVED_NAMES = tuple(f"<reserved{n:05d}>" for n in range(8300, 8300 + 128))
PROMPT_TEMPLATE = "Generate an image of {width}x{height} according to the following prompt:\n"
PIXELS_PER_CODE = 16
PIXELS_PER_RES_UNIT = 32
CHECKPOINT_HINT = (
    "download a Lumina-mGPT checkpoint on a machine with internet, e.g. "
    "`huggingface-cli download Alpha-VLLM/Lumina-mGPT-7B-768 --local-dir models/weights/lumina_mgpt_768`, "
    "and point model.path at that folder (config.json with model_type 'chameleon', *.safetensors, tokenizer "
    "files); or set model.local_files_only=false to let transformers download it"
)

_LETTER_DIGITS = {chr(ord("A") + d): str(d) for d in range(10)}


def parse_code_name(name: str) -> int | None:
    """``IMGIMG<letters>Z`` -> the code its letters spell (A=0 .. J=9); None for other names."""
    m = re.fullmatch(r"IMGIMG([A-J]+)Z", name)
    return int("".join(_LETTER_DIGITS[c] for c in m.group(1))) if m else None


def code_name(code: int) -> str:
    """The vocabulary name of VQ code ``code`` (inverse of :func:`parse_code_name`)."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(int(code))) + "Z"


def resolution_name(n_units: int) -> str:
    """Name of the resolution token of a side of ``n_units * 32`` pixels."""
    return f"<reserved{8800 + n_units:05d}>"


def _vocab_id(vocab: Mapping[str, int], name: str) -> int:
    return hf_common.vocab_id(vocab, name, "a Chameleon / Lumina-mGPT")


def lumina_layout(vocab: Mapping[str, int], image_size: int, code_range: tuple[int, int]) -> ImageLayout:
    """The image-sequence layout of a square ``image_size`` image (a multiple of 32 px)."""
    if image_size < PIXELS_PER_RES_UNIT or image_size % PIXELS_PER_RES_UNIT:
        raise ValueError(
            f"impossible Lumina-mGPT image size {image_size}px: must be a positive multiple of "
            f"{PIXELS_PER_RES_UNIT}px (the resolution token counts 32 px units; 768 for Lumina-mGPT-7B-768)"
        )
    res = _vocab_id(vocab, resolution_name(image_size // PIXELS_PER_RES_UNIT))
    side = image_size // PIXELS_PER_CODE
    return ImageLayout(
        height=side,
        width=side,
        head=(_vocab_id(vocab, IMG_START_NAME), res, res),
        eol=_vocab_id(vocab, EOL_NAME),
        tail=(_vocab_id(vocab, IMG_END_NAME), _vocab_id(vocab, EOT_NAME)),
        code_start=code_range[0],
        code_stop=code_range[1],
    )


# ---------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class RandomSizes(hf_common.RandomSizes):
    """Sizes of a randomly initialised tiny Lumina-mGPT: the language model's and its VQGAN's."""

    vq_ch: int = 8  # VQGAN base channels (Meta: 128)
    vq_z_channels: int = 8  # VQGAN latent / codebook width (Meta: 256)
    vq_norm_groups: int = 4  # VQGAN GroupNorm groups (Meta: 32)


@dataclass(frozen=True)
class LuminaMGPTConfig(hf_common.HFModelConfig):
    """``conf/model/lumina_mgpt*.yaml`` (keys 1:1): the shared keys, then the VQGAN folder."""

    sizes_class = RandomSizes

    family: str = "lumina_mgpt"
    name: str = "lumina_mgpt_768"
    path: str | None = "Alpha-VLLM/Lumina-mGPT-7B-768"
    image_size: int = 768  # multiple of 32
    vq_path: str | None = None  # folder with Meta's vqgan.yaml + vqgan.ckpt; null: no image codec


# ---------------------------------------------------------------------------------------------------
# Checkpoint conversion


def load_chameleon(ckpt: Path, dtype: torch.dtype):
    """``ChameleonForConditionalGeneration`` from a Lumina-mGPT folder: transformers' streaming loader (one
    copy of the weights in memory) with the q/k-norm rows expanded as the shards stream in
    (:func:`models.hf_loading.register_qk_norm_expansion`). Lumina checkpoints carry no ``model.vqmodel.*``
    (transformers' encoder-only Chameleon VQ, unused here: images go through Meta's VQGAN); it is left to
    its fresh init, every other key must be in the files."""
    from transformers import ChameleonForConditionalGeneration

    read_checkpoint_config(ckpt, "chameleon", CHECKPOINT_HINT)
    register_qk_norm_expansion(ChameleonForConditionalGeneration.__name__)
    return load_pretrained(ChameleonForConditionalGeneration, ckpt, dtype, CHECKPOINT_HINT,
                           allowed_missing=("model.vqmodel.",))


# ---------------------------------------------------------------------------------------------------
# Tiny random configuration


def tiny_vocab_names(code_order: torch.Tensor | None = None) -> dict[int, str]:
    """id -> name for a Chameleon-like vocabulary at the real ids (text bytes at 9000..9255).

    ``code_order`` [8192]: the code that id ``4 + i`` spells (default: the identity); tests shuffle it
    to prove that the adapter maps codes by name.
    """
    order = torch.arange(8192) if code_order is None else torch.as_tensor(code_order)
    names = {0: BOS_NAME, 1: PAD_NAME, 2: "</s>", 3: "<unk>", 8196: IMG_END_NAME, 8197: IMG_START_NAME}
    names.update({4 + i: code_name(int(c)) for i, c in enumerate(order.tolist())})
    names.update({i: f"<reserved{i - 4:05d}>" for i in range(8198, 9000)})
    names[8711] = "<image>"  # transformers' Chameleon conversion renames <reserved08707>
    return names


def tiny_tokenizer(code_order: torch.Tensor | None = None, vocab_size: int = 65536):
    """A byte-level tokenizer with the Chameleon special names at their real ids."""
    return byte_level_tokenizer(
        tiny_vocab_names(code_order), vocab_size, text_base=9000,
        special={"bos_token": BOS_NAME, "eos_token": "</s>", "pad_token": PAD_NAME, "unk_token": "<unk>"},
    )


def tiny_vqgan_config(sizes: RandomSizes, image_size: int) -> VQGANConfig:
    """Meta's VQGAN shape (8192 codes, downsample 16) with tiny widths."""
    return VQGANConfig(
        embed_dim=sizes.vq_z_channels, n_embed=8192, z_channels=sizes.vq_z_channels, resolution=image_size,
        ch=sizes.vq_ch, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(), attn_type="none",
        norm_groups=sizes.vq_norm_groups,
    )


def tiny_chameleon(sizes: RandomSizes, vocab: Mapping[str, int], vocab_size: int = 65536):
    """A randomly initialised ``ChameleonForConditionalGeneration`` with the given sizes."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    config = ChameleonConfig(
        **sizes.text_config(vocab_size, vocab[BOS_NAME], vocab[EOT_NAME], vocab[PAD_NAME]),
        vq_config={"base_channels": 32, "channel_multiplier": [1], "num_res_blocks": 1, "embed_dim": 8,
                   "latent_channels": 8, "num_embeddings": 8192},  # transformers' encoder-only VQ: unused
        vocabulary_map=dict(vocab),
    )
    return ChameleonForConditionalGeneration(config)


# ---------------------------------------------------------------------------------------------------
# Adapter


class LuminaMGPTAdapter(CodeMappedAdapter):
    """Lumina-mGPT through ``ChameleonForConditionalGeneration`` + Meta's VQGAN."""

    def __init__(self, model: Any, tokenizer: Any, vq: ChameleonVQGAN | None, cfg: LuminaMGPTConfig):
        vocab = self._setup(model, model.model, tokenizer, cfg, parse_code_name)  # ChameleonModel: no logit masking
        self.vq = vq.eval() if vq is not None else None
        self.layout = lumina_layout(vocab, self.image_size, self.code_map.id_range())
        self.bos_id = _vocab_id(vocab, BOS_NAME)
        self.eot_id = _vocab_id(vocab, EOT_NAME)
        self._reserved = tuple(_vocab_id(vocab, n) for n in RESERVED_NAMES)
        if self.vq is not None and self.vq.cfg.n_embed != self.code_map.n_codes:
            raise ValueError(f"the VQGAN (model.vq_path) has {self.vq.cfg.n_embed} codes but the vocabulary names "
                             f"{self.code_map.n_codes} image codes; point model.vq_path at Meta's Chameleon tokenizer "
                             "folder (vqgan.yaml + vqgan.ckpt, 8192 codes)")
        self._check_positions()

    # -- prompt ------------------------------------------------------------------------------------
    def prompt_ids(self, text: str) -> list[int]:
        """``<s>`` + template + caption + end of turn (the conditional prompt, no padding)."""
        head = PROMPT_TEMPLATE.format(width=self.image_size, height=self.image_size)
        return [self.bos_id] + list(self.tokenizer.encode(head + text, add_special_tokens=False)) + [self.eot_id]

    def prompt(self, text: str, cfg: bool = True) -> Prefill:
        """Row 0: the prompt; row 1 (CFG): the same ids, all masked out but the last (end of turn)."""
        ids = torch.tensor([self.prompt_ids(text)], dtype=torch.long)  # [1, T]
        mask = torch.ones_like(ids)
        if not cfg:
            return Prefill(ids, mask)
        uncond = torch.zeros_like(mask)
        uncond[:, -1] = 1
        return Prefill(ids.repeat(2, 1), torch.cat([mask, uncond]))

    @property
    def reserved_ids(self) -> tuple[int, ...]:
        return self._reserved

    # -- image codec -------------------------------------------------------------------------------
    def _need_vq(self) -> ChameleonVQGAN:
        return super()._need_vq(f"model {self.name!r} has no image codec (model.vq_path is null); {VQ_HINT}")

    def decode_image(self, tokens: torch.Tensor):
        """Full image sequence [n_tokens] -> PIL image (codes mapped by name, Meta's VQGAN decoder)."""
        return pixels_to_pil(self._need_vq().decode(self.image_codes(tokens)[None])[0])

    def encode_image(self, image: Any) -> torch.Tensor:
        """PIL image of exactly ``image_size`` px -> full image sequence [n_tokens]."""
        if tuple(image.size) != (self.image_size, self.image_size):
            raise ValueError(
                f"encode_image needs a {self.image_size}x{self.image_size} image, got {image.size[0]}x{image.size[1]}; "
                "resize/center-crop first (train.data.fit_image)"
            )
        codes = self._need_vq().encode(pil_to_pixels(image))[0].cpu()  # [h, w]
        return self.layout.sequence(self.code_map.to_ids(codes))


def build_random(cfg: LuminaMGPTConfig, code_order: torch.Tensor | None = None) -> LuminaMGPTAdapter:
    """Tiny randomly initialised Lumina-mGPT with a tokenizer and VQGAN built in code (seeded)."""
    sizes = cfg.random_sizes or RandomSizes()
    tokenizer = tiny_tokenizer(code_order)
    torch.manual_seed(cfg.seed)
    model = tiny_chameleon(sizes, tokenizer.get_vocab())
    vq = ChameleonVQGAN(tiny_vqgan_config(sizes, cfg.image_size))
    model.to(device=cfg.device, dtype=torch_dtype(cfg.dtype))
    vq.to(device=cfg.device)
    return LuminaMGPTAdapter(model, tokenizer, vq, cfg)


def load(cfg: LuminaMGPTConfig) -> LuminaMGPTAdapter:
    """Real weights: checkpoint folder (or cached hub id) + tokenizer + Meta's VQGAN (``vq_path``)."""
    ckpt = resolve_checkpoint(cfg.path, cfg.local_files_only, CHECKPOINT_HINT)
    model = load_chameleon(ckpt, torch_dtype(cfg.dtype))
    tokenizer = load_tokenizer(ckpt, CHECKPOINT_HINT, config=model.config)
    vq = None
    if cfg.vq_path:
        from models import resolve_path

        vq = load_vqgan(resolve_path(cfg.vq_path), device=cfg.device)
    model.to(cfg.device)
    return attach_sjd2_extras(LuminaMGPTAdapter(model, tokenizer, vq, cfg), ckpt)


def load_from_config(cfg: Mapping[str, Any]) -> LuminaMGPTAdapter:
    """``conf/model/lumina_mgpt*.yaml`` -> adapter (``random_init: true``: tiny model built in code)."""
    config = config_from_mapping(LuminaMGPTConfig, cfg)
    return build_random(config) if config.random_init else load(config)


__all__ = [
    "CodeMap", "LuminaMGPTAdapter", "LuminaMGPTConfig", "RandomSizes", "build_random", "code_name",
    "expand_qk_norm", "load", "load_from_config", "lumina_layout", "parse_code_name",
]
