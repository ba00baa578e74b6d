"""Janus-Pro (1B, 7B) behind the adapter protocol (DESIGN.md section 3), through transformers 5.x.

Model: ``transformers.JanusForConditionalGeneration``. What its own image generation
(``generate(..., generation_mode="image")``, ``models/janus/modeling_janus.py``) does, and what this adapter
does the same way:

* **Prompt** (``JanusProcessor(..., generation_mode="image")`` after the hub chat template with one user
  turn and ``add_generation_prompt``): BOS + ``"<|User|>: {text}\\n\\n<|Assistant|>:"`` + ``<begin_of_image>``
  (BOI). The original Janus-Pro t2i script builds the same string (its SFT template, empty system prompt).
* **Unconditional CFG stream**: the same ids with every token that is neither BOS nor BOI replaced by the
  pad token, *attended* (attention mask 1): the prompt is padded, not dropped. Same length as the prompt.
* **Guidance**: ``u + s * (c - u)`` on raw logits, ``s = 5`` when unset (``sampling_defaults.cfg_scale``).
* **Image tokens enter and leave through their own modules**: input embedding
  ``model.generation_aligner(model.generation_embeddings(code))`` (an 8-d codebook embedding, then an MLP
  into the language model's width), logits ``model.generation_head(hidden)`` over the 16,384 codes (not the
  text embedding / LM head). Backbone: ``model.model.language_model`` (Llama).
* **Layout**: 24 x 24 codes at 384 px (16 px per code), row-major, *no* end-of-line column, *no* head and
  *no* tail tokens: BOI ends the prompt (it is not generated) and generation stops after the last code
  (``<end_of_image>`` is never emitted) -> exactly 576 AR steps (prefill + 575), as ``generate`` spends.
* **Pixels**: ``decode_image_tokens`` (the VQ decoder) -> ``x * std + mean`` (0.5 / 0.5), ``* 255``,
  clip, truncate to uint8 (``JanusImageProcessor.postprocess``); the encoder path is ``vqmodel.encode``.

Id space of this adapter (one space for the protocol's ``embed``/``forward``): **image code c is id c**
(0..16383, the column of ``generation_head``), **text token t is id 16384 + t**. So ``vocab_size`` = 16,384
= the logit width, the layout's code range is ``[0, 16384)``, training labels are codes, and ``embed`` sends
ids below 16,384 through the generation embedding + aligner and the others through the text embedding.

SJD2 (fine-tuning and decoding): the noise lives where every other adapter has it, in the space the
language model reads -- here the aligner's *output*. Normalisation statistics (``norm_stats``): ``per_dim``
(default; [ours, as DESIGN 5 for the other models]: mean/std per dimension over the aligned rows of all
16,384 codes) | ``scalar`` ([ours]: one mean and one std over every entry of those rows: isotropic noise that
keeps the aligner's relative scales). Timestep tokens (``reserved_ids``): text-vocabulary rows no tokenizer
entry maps to (the Janus-Pro text embedding has 102,400 rows, more than its tokenizer names; [ours]).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import hf_common
from models.base import HFAdapter, ImageLayout, Prefill, attach_sjd2_extras, left_pad
from models.hf_common import (
    byte_level_tokenizer,
    config_from_mapping,
    load_tokenizer,
    read_checkpoint_config,
    resolve_checkpoint,
    torch_dtype,
)
from models.hf_loading import load_pretrained

BOS_NAME = "<｜begin▁of▁sentence｜>"
EOS_NAME = "<｜end▁of▁sentence｜>"
PAD_NAME = "<｜▁pad▁｜>"
BOI_NAME = "<begin_of_image>"
EOI_NAME = "<end_of_image>"
IMAGE_NAME = "<image_placeholder>"
PROMPT_TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:"
N_CODES = 16384
TEXT_VOCAB = 102400
PIXELS_PER_CODE = 16  # the VQ's 5 resolution levels (2 ** 4); the generated image is 24 x 16 = 384 px
N_RESERVED = 128  # timestep tokens offered (the first unnamed text rows)
NORM_STATS = ("per_dim", "scalar")
# ids of the tiny random tokenizer (those of the Janus-Pro tokenizer); it names ids below TINY_TOKENIZER_SIZE
TINY_IDS = {BOS_NAME: 100000, EOS_NAME: 100001, PAD_NAME: 100002, BOI_NAME: 100016, IMAGE_NAME: 100581,
            EOI_NAME: 100593}
TINY_TOKENIZER_SIZE = 100600
CHECKPOINT_HINT = (
    "download the transformers-native Janus-Pro checkpoint on a machine with internet, e.g. "
    "`huggingface-cli download deepseek-community/Janus-Pro-1B --local-dir models/weights/janus_pro_1b`, and point "
    "model.path at that folder (config.json with model_type 'janus', *.safetensors, tokenizer files; the "
    "remote-code deepseek-ai/Janus-Pro-* repos do not load here); or set model.local_files_only=false to download it"
)


# ---------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class RandomSizes(hf_common.RandomSizes):
    """Sizes of a randomly initialised tiny Janus: the language model's, its (unused) vision tower's and VQ's."""

    vision_hidden_size: int = 32  # understanding encoder (SigLIP; unused by image generation)
    vision_num_hidden_layers: int = 1
    vq_base_channels: int = 32  # VQ width (Janus-Pro: 128; GroupNorm needs a multiple of 32)
    vq_latent_channels: int = 32  # Janus-Pro: 256
    vq_embed_dim: int = 8  # codebook vector size (Janus-Pro: 8)
    vq_num_res_blocks: int = 1  # Janus-Pro: 2


@dataclass(frozen=True)
class JanusProConfig(hf_common.HFModelConfig):
    """``conf/model/janus*.yaml`` (keys 1:1): the shared keys, then the codebook, prompt, pixels and SJD2 norm."""

    sizes_class = RandomSizes

    family: str = "janus"
    name: str = "janus_pro_1b"
    path: str | None = "deepseek-community/Janus-Pro-1B"
    image_size: int = 384  # fixed by the checkpoint (24 x 24 codes); a multiple of 16 for random_init
    codebook_size: int = N_CODES  # generation codebook; a checkpoint with another one is refused
    prompt_template: str = PROMPT_TEMPLATE  # {prompt}: the caption; BOS before, <begin_of_image> after
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # VQ pixel normalisation ([-1, 1])
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    norm_stats: str = "per_dim"  # SJD2 normalisation statistics in the aligner's output space: per_dim | scalar

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))
        if self.norm_stats not in NORM_STATS:
            raise ValueError(f"model.norm_stats must be one of {list(NORM_STATS)}, got {self.norm_stats!r}")
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"model.prompt_template must contain {{prompt}}, got {self.prompt_template!r}")
        if self.image_size < PIXELS_PER_CODE or self.image_size % PIXELS_PER_CODE:
            raise ValueError(f"impossible Janus image size {self.image_size}px: a positive multiple of "
                             f"{PIXELS_PER_CODE}px (384 for Janus-Pro)")


def janus_layout(image_size: int, n_codes: int) -> ImageLayout:
    """(image_size / 16)^2 codes, row-major; no head, no end-of-line column, no tail; codes are ids 0..n-1."""
    side = image_size // PIXELS_PER_CODE
    return ImageLayout(height=side, width=side, head=(), eol=None, tail=(), code_start=0, code_stop=n_codes)


# ---------------------------------------------------------------------------------------------------
# Adapter


class JanusAdapter(HFAdapter):
    """Janus-Pro through ``JanusForConditionalGeneration`` (its own generation embedding, aligner, head, VQ)."""

    def __init__(self, model: Any, tokenizer: Any, cfg: JanusProConfig):
        self.name, self.cfg = cfg.name, cfg
        self.model = model.eval()
        self.backbone = model.model.language_model  # LlamaModel: inputs_embeds + past_key_values
        self.lm_head = model.model.generation_head  # JanusVQVAEHead: hidden -> logits over the codes
        self.tokenizer = tokenizer
        self.sjd2_recipe: dict | None = None  # set by attach_sjd2_extras for SJD2 fine-tuned checkpoints
        self.timestep_mlp: torch.nn.Module | None = None
        self.image_size = int(cfg.image_size)
        self.sampling_defaults = dict(cfg.sampling_defaults)
        check_sizes(model.config, cfg, where="the model")
        self.n_codes = int(model.config.vq_config.num_embeddings)
        self.layout = janus_layout(self.image_size, self.n_codes)
        self.ids = special_ids(tokenizer, model.generation_config)  # text ids (unshifted)
        used = set(tokenizer.get_vocab().values())
        text_vocab = int(model.config.text_config.vocab_size)
        self._reserved = tuple(self.text_id(i) for i in range(text_vocab) if i not in used)[:N_RESERVED]

    # -- id space, embeddings, logits -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.lm_head.vision_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.vision_head.weight.dtype

    @property
    def vocab_size(self) -> int:
        """The logit width: the generation codebook (text ids live above it, embedding only)."""
        return self.n_codes

    def text_id(self, token: int) -> int:
        return self.n_codes + int(token)

    @property
    def pad_id(self) -> int:
        """The pad token in this adapter's id space (the trainer pads with it)."""
        return self.text_id(self.ids["pad"])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, D] (model dtype): :meth:`embed_with` this adapter's model."""
        return self.embed_with(self.model, ids.to(self.device))

    def embed_with(self, model: Any, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, D] through ``model`` (this adapter's, or the trainer's copy of it): codes through
        generation_embeddings + generation_aligner, text through the text embedding. Both run on every call
        (under ZeRO-3 every rank must call the same modules)."""
        is_code = ids < self.n_codes  # [B, L]
        text = model.get_input_embeddings()((ids - self.n_codes).clamp_min(0))
        image = model.prepare_embeddings_for_image_generation(ids.clamp_max(self.n_codes - 1))
        return torch.where(is_code.unsqueeze(-1), image.to(text.dtype), text)

    def embedding_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [D], std [D]) of the aligned code embeddings (the rows the language model reads), by
        ``norm_stats`` (module docstring)."""
        with torch.no_grad():
            codes = torch.arange(self.n_codes, device=self.device)
            rows = self.model.prepare_embeddings_for_image_generation(codes).float()  # [N, D]
        if self.cfg.norm_stats == "scalar":
            return torch.full_like(rows[0], float(rows.mean())), torch.full_like(rows[0], float(rows.std()))
        return rows.mean(0), rows.std(0).clamp_min(1e-6)

    # -- prompt ------------------------------------------------------------------------------------
    def prompt_ids(self, text: str) -> list[int]:
        """BOS + the template around the caption + BOI, in this adapter's id space."""
        body = self.tokenizer.encode(self.cfg.prompt_template.format(prompt=text.strip()), add_special_tokens=False)
        return [self.text_id(t) for t in (self.ids["bos"], *body, self.ids["boi"])]

    def prompt(self, text: str, cfg: bool = True) -> Prefill:
        """Row 0: the prompt; row 1 (CFG): every id but BOS and BOI replaced by pad, attended (as ``generate``)."""
        row = self.prompt_ids(text)
        rows = [row]
        if cfg:
            keep = {self.text_id(self.ids["bos"]), self.text_id(self.ids["boi"])}
            rows.append([t if t in keep else self.pad_id for t in row])
        return left_pad(rows, self.pad_id)

    @property
    def reserved_ids(self) -> tuple[int, ...]:
        return self._reserved

    # -- image codec -------------------------------------------------------------------------------
    def decode_image(self, tokens: torch.Tensor):
        """Full image sequence [n_tokens] (codes) -> PIL image through ``decode_image_tokens``."""
        from PIL import Image

        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()
        bad = self.layout.violations(tokens)
        if bad:
            raise ValueError(f"the sequence breaks the Janus layout at positions {bad[:5]} "
                             f"(need {self.layout.n_tokens} codes in [0, {self.n_codes}))")
        with torch.no_grad():
            pixels = self.model.decode_image_tokens(tokens[None].to(self.device))  # [1, H, W, 3], normalised
        mean, std = torch.tensor(self.cfg.image_mean), torch.tensor(self.cfg.image_std)
        rgb = ((pixels[0].float().cpu() * std + mean) * 255).clamp(0, 255).to(torch.uint8)  # truncates, as postprocess
        return Image.fromarray(np.ascontiguousarray(rgb.numpy()), "RGB")

    @torch.no_grad()
    def encode_image(self, image: Any) -> torch.Tensor:
        """PIL image of exactly ``image_size`` px -> the image sequence [n_tokens] of codes (VQ encoder)."""
        if tuple(image.size) != (self.image_size, self.image_size):
            raise ValueError(
                f"encode_image needs a {self.image_size}x{self.image_size} image, got {image.size[0]}x{image.size[1]}; "
                "resize/center-crop first (train.data.fit_image)"
            )
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
        mean, std = np.asarray(self.cfg.image_mean, np.float32), np.asarray(self.cfg.image_std, np.float32)
        pixels = torch.from_numpy((arr - mean) / std).permute(2, 0, 1)[None]  # [1, 3, H, W]
        vq = self.model.model.vqmodel
        out = vq.encode(pixels.to(self.device, vq.dtype))
        side = self.layout.height
        return self.layout.sequence(out.image_tokens.reshape(side, side).cpu())


def special_ids(tokenizer: Any, generation_config: Any) -> dict[str, int]:
    """BOS, pad and BOI as ``generate(generation_mode="image")`` takes them (the generation config's
    ``bos_token_id``, ``pad_token_id``, ``generation_kwargs["boi_token_id"]``), else from the tokenizer."""
    vocab = tokenizer.get_vocab()
    gen_kwargs = getattr(generation_config, "generation_kwargs", None) or {}
    def first(*values: Any) -> Any:
        return next((v for v in values if v is not None), None)

    out = {
        "bos": first(getattr(generation_config, "bos_token_id", None), tokenizer.bos_token_id),
        "pad": first(getattr(generation_config, "pad_token_id", None), tokenizer.pad_token_id),
        "boi": first(gen_kwargs.get("boi_token_id"), vocab.get(BOI_NAME)),
    }
    missing = sorted(k for k, v in out.items() if v is None)
    if missing:
        raise ValueError(f"the Janus tokenizer / generation config names no {missing} token(s) "
                         f"({BOS_NAME}, {PAD_NAME}, {BOI_NAME}): is this a Janus-Pro checkpoint?")
    return {k: int(v) for k, v in out.items()}


def check_sizes(hf_config: Any, cfg: JanusProConfig, where: str) -> None:
    """Refuse a checkpoint whose image size or generation codebook differs from the config (one line)."""
    vq, vision = hf_config.vq_config, hf_config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)  # = vq_config.num_patches
    pixels = side * 2 ** (len(vq.channel_multiplier) - 1)
    if pixels != cfg.image_size or int(vision.num_image_tokens) != side * side:
        raise ValueError(
            f"{where} generates {pixels}px images ({side}x{side} codes, {vision.num_image_tokens} image tokens) but "
            f"model.image_size={cfg.image_size}; set model.image_size={pixels} (Janus generates at its checkpoint's "
            "fixed size) or point model.path at the checkpoint you meant"
        )
    if int(vq.num_embeddings) != cfg.codebook_size:
        raise ValueError(
            f"{where} has a {vq.num_embeddings}-code generation codebook but model.codebook_size={cfg.codebook_size}; "
            "point model.path at a Janus-Pro checkpoint (16384 codes) or set model.codebook_size to match"
        )


# ---------------------------------------------------------------------------------------------------
# Tiny random configuration, loading


def tiny_tokenizer():
    """A byte-level tokenizer with Janus-Pro's special names at their real ids (ids >= 100600 unnamed)."""
    names = {i: n for n, i in TINY_IDS.items()}
    return byte_level_tokenizer(names, TINY_TOKENIZER_SIZE, text_base=0,
                                special={"bos_token": BOS_NAME, "eos_token": EOS_NAME, "pad_token": PAD_NAME})


def tiny_janus(sizes: RandomSizes, image_size: int, codebook_size: int = N_CODES):
    """A randomly initialised ``JanusForConditionalGeneration`` with a generation config as the hub's."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    text = {"model_type": "llama", **sizes.text_config(TEXT_VOCAB, TINY_IDS[BOS_NAME], TINY_IDS[EOS_NAME],
                                                          TINY_IDS[PAD_NAME])}
    side = image_size // PIXELS_PER_CODE
    vision = {"hidden_size": sizes.vision_hidden_size, "num_hidden_layers": sizes.vision_num_hidden_layers,
              "num_attention_heads": 2, "image_size": image_size, "patch_size": PIXELS_PER_CODE, "mlp_ratio": 2.0,
              "projection_dim": sizes.hidden_size, "num_image_tokens": side * side}
    vq = {"embed_dim": sizes.vq_embed_dim, "num_embeddings": codebook_size, "latent_channels": sizes.vq_latent_channels,
          "base_channels": sizes.vq_base_channels, "channel_multiplier": [1, 1, 1, 1, 1],
          "num_res_blocks": sizes.vq_num_res_blocks, "projection_dim": sizes.hidden_size,
          "image_token_embed_dim": sizes.hidden_size}
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=TINY_IDS[IMAGE_NAME])
    model = JanusForConditionalGeneration(config)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (TINY_IDS[n] for n in (BOS_NAME, EOS_NAME, PAD_NAME))
    gen.generation_kwargs = {"boi_token_id": TINY_IDS[BOI_NAME]}  # (not a field update() would set)
    return model


def build_random(cfg: JanusProConfig) -> JanusAdapter:
    """Tiny randomly initialised Janus with a tokenizer built in code (seeded)."""
    torch.manual_seed(cfg.seed)
    model = tiny_janus(cfg.random_sizes or RandomSizes(), cfg.image_size, cfg.codebook_size)
    model.to(device=cfg.device, dtype=torch_dtype(cfg.dtype))
    return JanusAdapter(model, tiny_tokenizer(), cfg)


def _processor_normalisation(ckpt: Path, cfg: JanusProConfig) -> JanusProConfig:
    """image_mean/std from the checkpoint's ``preprocessor_config.json`` when it states them."""
    from dataclasses import replace

    pre = ckpt / "preprocessor_config.json"
    raw = json.loads(pre.read_text()) if pre.is_file() else {}
    keys = {k: tuple(raw[k]) for k in ("image_mean", "image_std") if k in raw}
    return replace(cfg, **keys) if keys else cfg


def load(cfg: JanusProConfig) -> JanusAdapter:
    """Real weights from a checkpoint folder (or cached hub id); never downloads by default. A folder of
    another model type, image size or codebook is refused before the weights are read."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    ckpt = resolve_checkpoint(cfg.path, cfg.local_files_only, CHECKPOINT_HINT)
    read_checkpoint_config(ckpt, "janus", CHECKPOINT_HINT)
    check_sizes(JanusConfig.from_pretrained(str(ckpt), local_files_only=True), cfg, where=f"checkpoint {ckpt}")
    model = load_pretrained(JanusForConditionalGeneration, ckpt, torch_dtype(cfg.dtype), CHECKPOINT_HINT).to(cfg.device)
    tokenizer = load_tokenizer(ckpt, CHECKPOINT_HINT, config=model.config)
    return attach_sjd2_extras(JanusAdapter(model, tokenizer, _processor_normalisation(ckpt, cfg)), ckpt)


def load_from_config(cfg: Mapping[str, Any]) -> JanusAdapter:
    """``conf/model/janus*.yaml`` -> adapter (``random_init: true``: tiny model built in code)."""
    config = config_from_mapping(JanusProConfig, cfg)
    return build_random(config) if config.random_init else load(config)


__all__ = [
    "JanusAdapter", "JanusProConfig", "RandomSizes", "build_random", "check_sizes", "janus_layout", "load",
    "load_from_config", "special_ids",
]
