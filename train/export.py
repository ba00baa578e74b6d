"""The trained weights out of the run, in the model's own format (loadable as ``model=<name>_sjd2``).

The weights themselves are written by the adapter (``adapter.export``: tiny writes config.json +
model.safetensors + vq.safetensors, HF models ``save_pretrained`` + tokenizer), so the trainer needs no
knowledge of model classes; what SJD2 adds beside them is written here for every model.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from models.noisy import EmbeddingNorm, Sjd2Recipe
from train.config import TrainConfig


def export_path(path: str) -> Path:
    """A relative export_dir is relative to the repository root (where conf/model/*.yaml paths point)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(__file__).resolve().parents[1] / p


def export_weights(adapter: Any, state: dict[str, dict[str, torch.Tensor]], out_dir: str | Path,
                   cfg: TrainConfig, norm: EmbeddingNorm | None = None) -> Path:
    """Write the fine-tuned weights in the model's own format (``adapter.export``), plus ``sjd2.json`` and,
    with the MLP timestep signal, ``timestep_mlp.safetensors``.

    The recipe (:class:`models.noisy.Sjd2Recipe`: ``sjd2.json``; tiny also in ``config.extra["sjd2"]``)
    holds the noise options the model was trained with (the decoder checks them) and ``norm``: the frozen
    mean/std the training inputs were normalised with (those of the starting weights). A run without
    noise (``train.noise: null``, plain next-token pretraining) exports the weights alone.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = sjd2_recipe(cfg, norm) if cfg.noise is not None else None
    adapter.export(state["lm"], out, recipe)
    if recipe is None:
        return out
    if state.get("timestep_mlp"):
        save_file({k: v.contiguous() for k, v in state["timestep_mlp"].items()}, str(out / "timestep_mlp.safetensors"))
    (out / "sjd2.json").write_text(json.dumps(recipe.to_json(), indent=1))
    return out


def sjd2_recipe(cfg: TrainConfig, norm: EmbeddingNorm | None) -> Sjd2Recipe:
    """The recipe a run exports: its noise and norm, and how it trained (for the record)."""
    training = {"layout": asdict(cfg.layout), "objective": asdict(cfg.objective),
                "optim": {**asdict(cfg.optim), "betas": list(cfg.optim.betas)}, "name": cfg.name}
    return Sjd2Recipe(noise=cfg.noise, norm=norm, training=training)
