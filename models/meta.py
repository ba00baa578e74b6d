"""What a model config describes, without its weights: the model built on the ``meta`` device (no file of
weights read, no memory used), its parameter counts and the shapes that size memory. The ``dry_run=true``
plans of the train and decode stages (:mod:`train.dryrun`, :mod:`decode.dryrun`) are built on it.

Where the architecture comes from, first match wins: a local ``model.path`` folder's ``config.json``; the
Hugging Face cache (``local_files_only``); else the published configuration of the hub id, written below
from the sources :mod:`bench.published` names (Janus-Pro: DeepSeek's ``language_config`` of each size over
transformers' ``JanusConfig`` vision / VQ defaults). Tiny and ``random_init`` models are built for real:
they are small by construction.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from models import load_adapter, resolve_path
from models.hf_common import read_checkpoint_config

# family -> (config.json model_type, transformers config class, model class)
HF_CLASSES = {
    "lumina_mgpt": ("chameleon", "ChameleonConfig", "ChameleonForConditionalGeneration"),
    "emu3": ("emu3", "Emu3Config", "Emu3ForConditionalGeneration"),
    "janus": ("janus", "JanusConfig", "JanusForConditionalGeneration"),
}
_JANUS_TEXT = {"vocab_size": 102400, "intermediate_size": 11008, "max_position_embeddings": 16384,
               "num_key_value_heads": None, "rope_theta": 10000.0}
PUBLISHED: dict[str, dict[str, Any]] = {
    # Chameleon-7B's values (convert_chameleon_weights_to_hf.py) with Lumina-mGPT's 4096 positions
    "Alpha-VLLM/Lumina-mGPT-7B-768": {"vocab_size": 65536, "hidden_size": 4096, "intermediate_size": 11008,
                                      "num_hidden_layers": 32, "num_attention_heads": 32,
                                      "num_key_value_heads": 32, "max_position_embeddings": 4096,
                                      "vocabulary_map": {"<image>": 8711}},  # only the image id is read
    # transformers' Emu3Config defaults are Emu3-Gen's; only these two ids of the vocabulary map are read
    "BAAI/Emu3-Gen-hf": {"vocabulary_map": {"<|extra_200|>": 151846, "<image>": 151851}},
    "deepseek-community/Janus-Pro-7B": {"text_config": {**_JANUS_TEXT, "hidden_size": 4096, "num_hidden_layers": 30,
                                                        "num_attention_heads": 32, "num_key_value_heads": 32}},
    "deepseek-community/Janus-Pro-1B": {"text_config": {**_JANUS_TEXT, "hidden_size": 2048, "intermediate_size": 5504,
                                                        "num_hidden_layers": 24, "num_attention_heads": 16,
                                                        "num_key_value_heads": 16}},
}


@dataclass(frozen=True)
class ModelFacts:
    """The numbers a memory plan needs (language model = the part that generates image tokens)."""

    source: str  # where the architecture came from
    n_params: int  # every parameter of the module the stages load (image codec inside it included)
    largest_layer: int  # parameters of the biggest single module (DeepSpeed's ``model_to_params``)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    image_tokens: int  # tokens of one image sequence at the config's image_size (= AR forwards)


def param_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(total, largest single module) parameter counts, shared parameters once; works on ``meta``."""
    seen: dict[int, int] = {}
    for p in module.parameters():
        seen[id(p)] = p.numel()
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
    return sum(seen.values()), largest


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def hf_config(cfg: Mapping[str, Any]) -> tuple[Any, str]:
    """(the transformers config of ``cfg``'s real model, where it came from), reading no weights."""
    import transformers

    family, path = cfg.get("family"), str(cfg.get("path"))
    if family not in HF_CLASSES:
        raise ValueError(f"no architecture plan for model family {family!r}")
    model_type, config_name, _ = HF_CLASSES[family]
    config_cls = getattr(transformers, config_name)
    local = resolve_path(path)
    if (local / "config.json").is_file():
        read_checkpoint_config(local, model_type, f"model={cfg.get('name')} needs a {model_type} checkpoint")
        return config_cls.from_pretrained(str(local)), f"{local}/config.json"
    with contextlib.suppress(OSError, ValueError):
        return config_cls.from_pretrained(path, local_files_only=True), f"{path} (Hugging Face cache)"
    if path in PUBLISHED:
        return config_cls(**PUBLISHED[path]), f"{path} (published configuration, built in: models/meta.py)"
    raise FileNotFoundError(
        f"model.path={path} has no config.json here and is not a published model this project knows "
        f"({sorted(PUBLISHED)}); point model.path at the checkpoint folder (only config.json is read)")


def image_tokens(cfg: Mapping[str, Any], config: Any) -> int:
    """Tokens of one image sequence at ``cfg.image_size`` (the family's layout rules, no tokenizer)."""

    class AnyVocab(dict):  # every special name resolves (the count does not depend on the ids)
        def __contains__(self, key: object) -> bool:
            return True

        def __missing__(self, key: str) -> int:
            return 0

    family, size = cfg["family"], int(cfg["image_size"])
    if family == "lumina_mgpt":
        from models.lumina_mgpt import lumina_layout

        return lumina_layout(AnyVocab(), size, (0, 1)).n_tokens
    if family == "emu3":
        from models.emu3 import emu3_layout

        factor = 2 ** (len(config.vq_config.channel_multiplier) - 1)
        return emu3_layout(AnyVocab(), size, factor, (0, 1)).n_tokens
    from models.janus import janus_layout

    return janus_layout(size, int(config.vq_config.num_embeddings)).n_tokens


def _facts(module: torch.nn.Module, config: Any, n_image_tokens: int, source: str) -> ModelFacts:
    text = _text_config(config)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    total, largest = param_counts(module)
    return ModelFacts(source=source, n_params=total, largest_layer=largest, hidden=int(text.hidden_size),
                      intermediate=int(text.intermediate_size), layers=int(text.num_hidden_layers), heads=heads,
                      kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=head_dim,
                      vocab=int(text.vocab_size), max_positions=int(text.max_position_embeddings),
                      image_tokens=n_image_tokens)


def model_facts(cfg: Mapping[str, Any]) -> ModelFacts:
    """The :class:`ModelFacts` of a ``conf/model/*.yaml`` mapping, with no weights read."""
    import transformers

    if cfg.get("family") == "tiny" or cfg.get("random_init"):
        adapter = load_adapter({**cfg, "device": "cpu"})  # tiny by construction: built for real
        source = f"model={cfg.get('name')} (built: {'random init' if cfg.get('random_init') else 'embedded'})"
        return _facts(adapter.model, adapter.model.config, adapter.layout.n_tokens, source)
    config, source = hf_config(cfg)
    with torch.device("meta"):
        module = getattr(transformers, HF_CLASSES[cfg["family"]][2])(config)
    return _facts(module, config, image_tokens(cfg, config), source)


def dtype_bytes(name: str) -> int:
    return torch.empty(0, dtype=getattr(torch, str(name))).element_size()


def count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"

