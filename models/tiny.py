"""``tiny``: the embedded default model, a small Llama trained on ``shapes`` (DESIGN.md section 7).

Same layout shape as the real models: ``[<img_start>, <res h>, <res w>]``, ``h`` rows of ``w`` codes
each followed by ``<eol>``, then ``<img_end>``, ``<eos>``. The text tokenizer is word-level over the
shapes grammar; the unconditional CFG context is the empty prompt (``<bos>`` alone).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from models.base import HFAdapter, ImageLayout, Prefill, attach_sjd2_extras, left_pad
from models.noisy import Sjd2Recipe

# Vocabulary map (fixed; the word list and the codebook size come from the checkpoint's config).
PAD, BOS, EOS, IMG_START, IMG_END, EOL = 0, 1, 2, 3, 4, 5
RES_BASE, N_RES = 8, 32  # resolution token of a side of n codes: RES_BASE + n
RESERVED_BASE, N_RESERVED = 40, 64  # never used by plain training: SJD2 noise-level tokens
WORD_BASE = 104
CODE_BASE = 256  # image code c has vocab id CODE_BASE + c

DEFAULT_PATH = "models/weights/tiny"
MAKE_HINT = "run `make tiny-model` to train it (about 45 minutes on 2 CPU cores)"


class WordTokenizer:
    """Word-level tokenizer over a closed vocabulary (the shapes grammar)."""

    def __init__(self, words: tuple[str, ...]):
        if len(words) > CODE_BASE - WORD_BASE:
            raise ValueError(f"{len(words)} words do not fit the tiny vocabulary ({CODE_BASE - WORD_BASE})")
        self.words = tuple(words)
        self._ids = {w: WORD_BASE + i for i, w in enumerate(self.words)}

    def encode(self, text: str) -> list[int]:
        out = []
        for w in text.lower().replace(",", " ").split():
            if w not in self._ids:
                raise ValueError(
                    f"word {w!r} of prompt {text!r} is outside the tiny model's vocabulary; "
                    f"allowed words: {' '.join(self.words)}"
                )
            out.append(self._ids[w])
        return out

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i - WORD_BASE] for i in ids if WORD_BASE <= i < WORD_BASE + len(self.words))


@dataclass(frozen=True)
class TinyConfig:
    words: tuple[str, ...]
    n_codes: int
    patch: int = 4  # pixels per code side (the shapes VQ)
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 704
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    extra: dict = field(default_factory=dict)  # e.g. the SJD2 fine-tuning recipe that produced it

    @property
    def vocab_size(self) -> int:
        return CODE_BASE + self.n_codes

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
            tie_word_embeddings=False,
        )


def tiny_layout(image_size: int, patch: int, n_codes: int) -> ImageLayout:
    if image_size < patch or image_size % patch:
        raise ValueError(f"impossible image size {image_size}px: must be a positive multiple of {patch}px")
    side = image_size // patch
    if side >= N_RES:
        raise ValueError(f"impossible image size {image_size}px: at most {(N_RES - 1) * patch}px for tiny")
    return ImageLayout(
        height=side,
        width=side,
        head=(IMG_START, RES_BASE + side, RES_BASE + side),
        eol=EOL,
        tail=(IMG_END, EOS),
        code_start=CODE_BASE,
        code_stop=CODE_BASE + n_codes,
    )


class TinyAdapter(HFAdapter):
    """Adapter over a ``LlamaForCausalLM`` and the shapes patch VQ."""

    def __init__(self, model: LlamaForCausalLM, config: TinyConfig, vq: Any = None, image_size: int = 64,
                 name: str = "tiny"):
        self.name = name
        self.model = model.eval()
        self.backbone = model.model
        self.lm_head = model.lm_head
        self.config = config
        self.vq = vq
        self.tokenizer = WordTokenizer(config.words)
        self.image_size = image_size
        self.layout = tiny_layout(image_size, config.patch, config.n_codes)
        longest = self.layout.n_tokens + 32
        if longest > config.max_position_embeddings:
            raise ValueError(
                f"impossible image size {image_size}px: {self.layout.n_tokens} image tokens exceed the "
                f"model's {config.max_position_embeddings} positions"
            )

    def prompt_ids(self, text: str) -> list[int]:
        """``<bos>`` + words (the empty string gives the unconditional context)."""
        return [BOS] + self.tokenizer.encode(text)

    def prompt(self, text: str, cfg: bool = True) -> Prefill:
        rows = [self.prompt_ids(text)] + ([self.prompt_ids("")] if cfg else [])
        return left_pad(rows, PAD)

    @property
    def reserved_ids(self) -> tuple[int, ...]:
        return tuple(range(RESERVED_BASE, RESERVED_BASE + N_RESERVED))

    def _need_vq(self):
        return super()._need_vq(f"this tiny model has no image tokenizer loaded; {MAKE_HINT}")

    def decode_image(self, tokens: torch.Tensor):
        grid = self.layout.code_grid(tokens.cpu()) - CODE_BASE
        return self._need_vq().decode(grid)

    def encode_image(self, image) -> torch.Tensor:
        grid = self._need_vq().encode(image)
        return self.layout.sequence(grid + CODE_BASE)

    def _recipe_json(self) -> dict | None:
        """``sjd2.json`` when loaded from disk, else the copy the tiny format keeps in ``config.extra``."""
        return self.sjd2_recipe if self.sjd2_recipe is not None else self.config.extra.get("sjd2")

    def export(self, lm_state: dict[str, torch.Tensor], out_dir: Path, recipe: Sjd2Recipe | None) -> None:
        """The tiny format (config.json + model.safetensors + vq.safetensors) with the recipe also in
        ``config.extra["sjd2"]`` (no recipe: plain pretraining, no ``sjd2`` entry)."""
        extra = {k: v for k, v in self.config.extra.items() if k != "sjd2"}
        if recipe is not None:
            extra["sjd2"] = recipe.to_json()
        config = replace(self.config, extra=extra)
        model = LlamaForCausalLM(config.llama_config())
        model.load_state_dict({k: v.float() for k, v in lm_state.items()})
        save(TinyAdapter(model, config, vq=self.vq, image_size=self.image_size, name=self.name), out_dir)
        if self.vq is not None:
            self.vq.save(Path(out_dir) / "vq.safetensors")


def build(config: TinyConfig, seed: int = 0, vq: Any = None, image_size: int = 64,
          name: str = "tiny") -> TinyAdapter:
    """A randomly initialised tiny model (seeded)."""
    torch.manual_seed(seed)
    return TinyAdapter(LlamaForCausalLM(config.llama_config()), config, vq=vq, image_size=image_size, name=name)


def random_vq(config: TinyConfig, seed: int = 0):
    """A seeded random patch codebook of the config's size (random models still write images)."""
    from models.shapes_vq import PatchVQ

    g = torch.Generator().manual_seed(seed)
    return PatchVQ(torch.rand(config.n_codes, config.patch * config.patch * 3, generator=g) * 255, patch=config.patch)


def save(adapter: TinyAdapter, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = asdict(adapter.config)
    cfg["words"] = list(cfg["words"])
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    # float16 on disk keeps tiny + tiny_sjd2 under 20 MB in the repository; load() casts to model.dtype.
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in adapter.model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"), metadata={"stored_dtype": "float16"})


def load(path: str | Path, device: str = "cpu", dtype: str = "float32", image_size: int = 64,
         name: str = "tiny", vq_path: str | Path | None = None) -> TinyAdapter:
    """Load a trained tiny model (config.json + model.safetensors) and the shapes VQ."""
    from models import resolve_path
    from models.shapes_vq import PatchVQ

    path = resolve_path(path)
    for f in ("config.json", "model.safetensors"):
        if not (path / f).is_file():
            raise FileNotFoundError(f"tiny checkpoint file {path / f} does not exist; {MAKE_HINT}")
    raw = json.loads((path / "config.json").read_text())
    raw["words"] = tuple(raw["words"])
    config = TinyConfig(**raw)
    vq_file = resolve_path(vq_path) if vq_path else path / "vq.safetensors"
    if not Path(vq_file).is_file():
        raise FileNotFoundError(f"shapes tokenizer {vq_file} does not exist; {MAKE_HINT}")
    vq = PatchVQ.load(vq_file)
    model = LlamaForCausalLM(config.llama_config())
    model.load_state_dict({k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()})
    model.to(device=device, dtype=getattr(torch, dtype))
    return attach_sjd2_extras(TinyAdapter(model, config, vq=vq, image_size=image_size, name=name), path)


@dataclass(frozen=True)
class TinyModelConfig:
    """``conf/model/tiny*.yaml``: every key is in the YAML (no default hides in code); unknown keys are refused.

    ``random_init: true`` builds an untrained model instead of loading ``path``; then ``seed`` (weights and
    random codebook), ``architecture`` (:class:`TinyConfig` sizes) and the image tokenizer are needed: a
    random codebook of ``n_codes`` codes, or with ``vq_fit_images > 0`` the shapes VQ fitted on that many
    rendered scenes drawn from ``vq_fit_seed`` (``n_codes`` codes; 0: the shapes VQ's default).
    """

    family: str
    name: str
    path: str | None
    vq_path: str | None
    image_size: int
    device: str
    dtype: str
    random_init: bool
    n_codes: int | None = None  # random_init only (the YAML of a random model states it)
    seed: int | None = None
    architecture: dict | None = None
    vq_fit_images: int = 0
    vq_fit_seed: int | None = None

    def __post_init__(self) -> None:
        if self.random_init:
            missing = [k for k in ("n_codes", "seed", "architecture") if getattr(self, k) is None]
            if self.vq_fit_images > 0 and self.vq_fit_seed is None:
                missing.append("vq_fit_seed")
            if missing:
                raise ValueError(f"model {self.name!r} has random_init: true but no {missing}; set them in its "
                                 "conf/model/*.yaml (see conf/model/tiny_random.yaml)")
        elif not self.path:
            raise ValueError(f"model {self.name!r} needs model.path (a tiny checkpoint folder) or random_init: true")


def shapes_images(n: int, seed: int) -> np.ndarray:
    """``n`` rendered shapes scenes uint8 [n, 64, 64, 3], drawn as ``train.tiny_recipe`` draws its training
    examples (one generator seeded ``seed``; its colour-share draw is kept so the same scenes come out)."""
    from data import shapes

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        rng.random()  # the recipe's colour-share draw (share 0 here)
        _, _, scene = shapes.sample_example(rng, None)
        images.append(shapes.render(scene))
    return np.stack(images)


def build_from_config(cfg: TinyModelConfig) -> TinyAdapter:
    """An untrained tiny model with a random codebook or a freshly fitted shapes VQ (``random_init``)."""
    from data.shapes import VOCAB

    vq = None
    if cfg.vq_fit_images > 0:
        from models.shapes_vq import fit

        images = shapes_images(cfg.vq_fit_images, cfg.vq_fit_seed)
        vq = fit(images, **({"n_codes": cfg.n_codes} if cfg.n_codes else {}), seed=cfg.seed)
    config = TinyConfig(words=tuple(VOCAB), n_codes=vq.n_codes if vq is not None else cfg.n_codes,
                        **cfg.architecture)
    return build(config, seed=cfg.seed, vq=vq if vq is not None else random_vq(config, cfg.seed),
                 image_size=cfg.image_size, name=cfg.name)


def load_from_config(cfg: Mapping[str, Any]) -> TinyAdapter:
    """``conf/model/tiny*.yaml`` -> adapter (:class:`TinyModelConfig`)."""
    from models.hf_common import config_from_mapping

    c = config_from_mapping(TinyModelConfig, cfg)
    if c.random_init:
        return build_from_config(c)
    return load(c.path, device=c.device, dtype=c.dtype, image_size=c.image_size, name=c.name, vq_path=c.vq_path)
