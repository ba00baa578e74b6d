"""Model adapters behind one protocol (see :mod:`models.base`), looked up by family name."""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.base import FREE, HFAdapter, ImageLayout, ModelAdapter, Prefill

REPO_ROOT = Path(__file__).resolve().parents[1]

# family -> "module:function"; each function takes the model config mapping and returns an adapter.
_LOADERS = {
    "tiny": "models.tiny:load_from_config",
    "lumina_mgpt": "models.lumina_mgpt:load_from_config",
    "emu3": "models.emu3:load_from_config",
    "janus": "models.janus:load_from_config",
}


def load_adapter(cfg: Mapping[str, Any]) -> ModelAdapter:
    """Build the adapter that ``cfg`` (a ``conf/model/*.yaml`` mapping) describes."""
    family = cfg.get("family")
    if family not in _LOADERS:
        raise ValueError(
            f"unknown model family {family!r} (model={cfg.get('name')!r}); known: {sorted(_LOADERS)}. "
            "Pick one of the configs in conf/model/."
        )
    module, fn = _LOADERS[family].split(":")
    return getattr(importlib.import_module(module), fn)(cfg)


def resolve_path(path: str | Path) -> Path:
    """A path as given if it exists, else relative to the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


__all__ = ["FREE", "HFAdapter", "ImageLayout", "ModelAdapter", "Prefill", "load_adapter", "resolve_path"]
