"""Compose a stage's config (``conf/<stage>.yaml``) outside a Hydra app: the demo, the benchmarks, tests.

A stage's typed schema (``decode/schema.py``, ``eval/schema.py``) and its resolvers are registered when
the stage's module is imported, so composing imports it first, by name: the ground floor never imports a
stage statically.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig

from core.errors import OptionError
from core.rundir import CONF_DIR

STAGE_MODULES = {"decode": "decode.run", "eval": "eval.run", "train": "train.run"}


def compose_config(overrides: Iterable[str] = (), config_name: str = "decode") -> DictConfig:
    """``conf/<config_name>.yaml`` with Hydra overrides applied (types checked by the stage's schema)."""
    from hydra import compose, initialize_config_dir

    if config_name in STAGE_MODULES:
        importlib.import_module(STAGE_MODULES[config_name])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": value}`` (what identity and resume checks compare key by key)."""
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_count(name: str, value: Any, minimum: int, *, none_ok: bool = False, meaning: str = "") -> None:
    """Refuse a count or size that is not an integer >= ``minimum`` (``None`` too unless ``none_ok``), in one
    line naming the option: every count a user can pass is checked where the stage reads its config."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        null = " (or null)" if none_ok else ""
        raise OptionError(f"{name}={value!r} must be an integer >= {minimum}{null}" + (f": {meaning}" if meaning else ""))


def check_device_dtype(model_cfg: Mapping[str, Any]) -> None:
    """``model.device`` must name a device this machine has, ``model.dtype`` a torch floating dtype (before
    the weights load, which would fail deep inside torch)."""
    import torch

    device, dtype = model_cfg.get("device"), model_cfg.get("dtype")
    if device is not None:
        try:
            dev = torch.device(str(device))
        except RuntimeError:
            raise OptionError(f"model.device={device!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise OptionError(f"model.device={device} but this machine has no CUDA device torch can use: pass "
                            "model.device=cpu")
    if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise OptionError(f"model.dtype={dtype!r} is not a torch dtype: use float32, bfloat16 or float16")
