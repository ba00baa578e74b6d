"""Loading a published transformers checkpoint with one copy of the weights in memory, and refusing one
that does not fit the model with one line that names the keys or files.

Weights go through transformers' own ``from_pretrained`` (the model is built on the meta device and every
tensor is read once from its safetensors shard, so host memory holds one copy of the weights), never
through a state dict read into memory first (which held the whole checkpoint twice at real size).
Conversions a family's files need are ``transformers`` weight converters registered for its class
(:func:`register_conversion`), applied while the shards stream in.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

INDEX = "model.safetensors.index.json"
SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def _first(items: Sequence[str], n: int = 3) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def check_weight_files(ckpt: Path, hint: str) -> list[Path]:
    """The weight files of a checkpoint folder, refusing an incomplete set before anything is read.

    A sharded checkpoint needs its index and every shard the index names; shards without an index, or
    shards of another count than their names say, are refused too. Returns the files.
    """
    index = ckpt / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise ValueError(f"{index} is not a safetensors index (no weight_map: {err}); re-download it") from err
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (ckpt / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{ckpt} is incomplete: {len(missing)} of {len(files)} weight shards named in {INDEX} are missing "
                f"({_first(missing)}); finish the download (huggingface-cli download resumes it)"
            )
        return [ckpt / f for f in files]
    shards = sorted(ckpt.glob("model-*-of-*.safetensors"))
    if shards:
        raise FileNotFoundError(
            f"{ckpt} holds {len(shards)} weight shards ({_first([s.name for s in shards])}) but no {INDEX}; "
            "finish the download (the index file names which tensor lives in which shard)"
        )
    single = [p for p in (ckpt / "model.safetensors", ckpt / "pytorch_model.bin") if p.is_file()]
    if single:
        return single
    raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {ckpt}; {hint}")


def _shard_count_check(files: list[Path]) -> None:
    for f in files:
        m = SHARD_RE.fullmatch(f.name)
        if m and int(m.group(2)) != len(files):
            raise ValueError(f"{f.name} says {int(m.group(2))} shards but the index names {len(files)}; "
                             "the index and the shards come from different downloads")


def load_pretrained(model_cls: Any, ckpt: Path, dtype: torch.dtype, hint: str,
                    allowed_missing: tuple[str, ...] = (), config: Any = None) -> Any:
    """``model_cls.from_pretrained(ckpt)`` in ``dtype``, refusing missing (except ``allowed_missing``
    prefixes), unexpected and mismatched keys with one line naming the first few."""
    _shard_count_check(check_weight_files(ckpt, hint))
    from transformers.utils import logging as hf_logging

    kwargs = {"config": config} if config is not None else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists keys we judge below, in one line
    try:
        model, info = model_cls.from_pretrained(str(ckpt), dtype=dtype, local_files_only=True,
                                                output_loading_info=True, **kwargs)
    except RuntimeError as err:
        if "mismatched" not in str(err) and "size mismatch" not in str(err):
            raise
        raise ValueError(f"{ckpt}: tensor shapes do not fit {model_cls.__name__} built from its config.json "
                         f"(the config and the weights come from different models); {hint}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith(allowed_missing)]
    unexpected = list(info.get("unexpected_keys", ()))
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", ())]
    if missing or unexpected or mismatched:
        parts = [f"{name} {len(keys)} ({_first(keys)})" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if keys]
        raise ValueError(f"{ckpt} does not fit {model_cls.__name__}: keys " + "; ".join(parts)
                         + f". Is it the checkpoint this model config names? {hint}")
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Conversions applied while the shards stream in


def expand_qk_norm(state: Mapping[str, torch.Tensor], num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor]:
    """Lumina/Chameleon q/k-norm weights ``[model_parallel, head_dim]`` -> ``[heads, head_dim]``.

    Lumina-mGPT stores one row per model-parallel shard (``[1, head_dim]`` for 7B) and applies row r to
    heads ``r * heads/shards ..``; transformers 5.x wants one row per head. Other tensors pass through.
    """
    out = dict(state)
    for key, value in state.items():
        m = re.search(r"self_attn\.(q|k)_norm\.(weight|bias)$", key)
        if m:
            out[key] = repeat_rows(key, value, num_heads if m.group(1) == "q" else num_kv_heads)
    return out


def repeat_rows(key: str, value: torch.Tensor, rows: int) -> torch.Tensor:
    """``value`` [r, d] with each row repeated to ``rows`` rows (row i serves rows i*rows/r ..)."""
    if value.ndim != 2 or rows % value.shape[0]:
        raise ValueError(f"{key} has shape {tuple(value.shape)}; cannot expand it to [{rows}, head_dim]")
    return value if value.shape[0] == rows else value.repeat_interleave(rows // value.shape[0], dim=0).contiguous()


def _rows_op() -> Any:
    """A transformers ``ConversionOps`` that repeats a tensor's rows to its parameter's row count (a no-op
    when they already agree; saving writes the expanded rows back unchanged)."""
    from transformers.core_model_loading import ConversionOps

    class RepeatRowsToParameter(ConversionOps):
        @torch.no_grad()
        def convert(self, input_dict: dict, source_patterns: list[str], target_patterns: list[str], **kwargs: Any):
            (tensors,) = input_dict.values()
            tensor = tensors[0] if isinstance(tensors, list) else tensors
            name = kwargs["full_layer_name"]
            rows = kwargs["model"].get_parameter(name).shape[0]
            return {target_patterns[0]: repeat_rows(name, tensor, rows)}

        @property
        def reverse_op(self) -> Any:
            return KeepAsIs()

    class KeepAsIs(ConversionOps):
        def convert(self, input_dict: dict, source_patterns: list[str], target_patterns: list[str], **kwargs: Any):
            (tensors,) = input_dict.values()
            return {target_patterns[0]: tensors[0] if isinstance(tensors, list) else tensors}

        @property
        def reverse_op(self) -> Any:
            return self

    return RepeatRowsToParameter()


def register_qk_norm_expansion(class_name: str) -> None:
    """Let ``class_name.from_pretrained`` read q/k-norm rows stored per model-parallel shard (idempotent)."""
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    patterns = [f"self_attn.{w}_norm.{p}" for w in ("q", "k") for p in ("weight", "bias")]
    register_checkpoint_conversion_mapping(
        class_name, [WeightConverter(source_patterns=p, target_patterns=p, operations=[_rows_op()]) for p in patterns],
        overwrite=True,
    )


def check_positions(n_needed: int, max_positions: int | None, what: str) -> None:
    """A prompt + image sequence longer than the model's position table is refused (RoPE models produce
    garbage there, they do not fail)."""
    if max_positions and n_needed > max_positions:
        raise ValueError(
            f"{what} needs {n_needed} positions but the model was trained with max_position_embeddings="
            f"{max_positions}; choose a smaller model.image_size"
        )


__all__ = ["check_positions", "check_weight_files", "expand_qk_norm", "load_pretrained",
           "register_qk_norm_expansion", "repeat_rows"]
