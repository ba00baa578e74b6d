"""Checkpoints in the run dir: ``checkpoints/latest`` names the newest ``step_XXXXXXX/`` tag (DeepSpeed's
convention, kept for the plain engine too), old tags are pruned, and a resume restores the engine states,
the RNG and the step, refusing a run whose world size, global batch or seed differ (the data order and
the ZeRO partitions depend on them).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from train.config import TrainConfig
from train.plan import Dist

LATEST = "latest"  # file in the checkpoint folder naming the newest tag (DeepSpeed's convention too)


def tag(step: int) -> str:
    return f"step_{step:07d}"


def latest_tag(ckpt_root: Path) -> str | None:
    f = ckpt_root / LATEST
    return f.read_text().strip() if f.is_file() else None


def prune_checkpoints(ckpt_root: Path, keep: int, protect: str) -> None:
    tags = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for p in tags[: max(0, len(tags) - max(keep, 1))]:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)


def client_state(step: int, cfg: TrainConfig, dist: Dist) -> dict:
    """What a checkpoint holds besides the engine states: the step, what resume must match, the RNG."""
    return {"step": step, "world_size": dist.world, "global_batch": cfg.global_batch, "seed": cfg.seed,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_checkpoint(engine: Any, root: Path, step: int, cfg: TrainConfig, dist: Dist) -> None:
    if dist.main:
        root.mkdir(parents=True, exist_ok=True)
    engine.save(root, tag(step), client_state(step, cfg, dist))
    if dist.main:
        prune_checkpoints(root, cfg.keep_checkpoints, tag(step))


def resume(engine: Any, root: Path, allowed: bool, dist: Dist, cfg: TrainConfig) -> int:
    """Restore the newest checkpoint under ``root`` into ``engine``; returns its step (0: none there)."""
    latest = latest_tag(root)
    if latest is None:
        return 0
    if not allowed:
        raise FileExistsError(
            f"{root} already holds checkpoint {latest}; pass resume=true to continue it, or pick a new run_dir"
        )
    client = engine.load(root, latest)
    for key, now in (("world_size", dist.world), ("global_batch", cfg.global_batch), ("seed", cfg.seed)):
        if client.get(key) != now:
            raise ValueError(
                f"checkpoint {root / latest} was written with {key}={client.get(key)}, this run has {key}={now}; "
                "resume with the same setting (the data order and ZeRO partitions depend on it) or start a new run_dir"
            )
    torch.set_rng_state(client["torch_rng"].cpu() if hasattr(client["torch_rng"], "cpu") else client["torch_rng"])
    if client.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(client["cuda_rng"])
    return int(client["step"])
