"""Typed config of the train stage, registered with Hydra's ConfigStore (as ``decode/schema.py`` does).

``conf/train.yaml`` extends :class:`TrainStage` (``defaults: [train_schema, ...]``), whose ``train`` node
has the fields and types of :class:`train.config.TrainConfig` (nested groups included), so Hydra refuses
a wrong type (``train.micro_batch=abc``) or an unknown option (``train.optim.lrr=1``) while composing,
naming the option, before anything is written. The frozen ``TrainConfig`` built from the composed node
(:func:`train.config.train_config_from_dict`) then checks the values with its own rules.

The mirrors are made from the frozen classes, so a field added there is typed here without a second list.
The YAML files hold every default a user sees.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from train.config import TrainConfig


def mutable_mirror(cls: type) -> type:
    """A plain (mutable) dataclass with ``cls``'s fields, types and defaults; nested dataclass fields are
    mirrored too. OmegaConf makes read-only nodes of frozen dataclasses, which the YAML could not fill."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):  # ``X | None`` of a dataclass
            mirror = mutable_mirror(inner[0])
            specs.append((f.name, typing.Optional[mirror], field(default_factory=mirror)))  # noqa: UP045
        elif dataclasses.is_dataclass(kind):
            kind = mutable_mirror(kind)
            specs.append((f.name, kind, field(default_factory=kind)))
        elif f.default is not dataclasses.MISSING:
            specs.append((f.name, kind, f.default))
        else:
            specs.append((f.name, kind, field(default_factory=f.default_factory)))
    return dataclasses.make_dataclass(f"{cls.__name__}Fields", specs)


TrainFields = mutable_mirror(TrainConfig)


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "sjd2"
    entity: str | None = None
    name: str | None = None


@dataclass
class TrainStage:
    """``conf/train.yaml``; ``model`` is checked by its loader."""

    model: Any = MISSING
    train: TrainFields = field(default_factory=TrainFields)
    run_dir: str = MISSING
    resume: bool = True
    allow_resume_change: bool = False
    progress: bool = True
    dry_run: bool = False
    gpus: int | None = None
    nodes: int = 1
    gpu_memory_gb: float = 80.0
    dry_run_records: int | None = None
    wandb: WandbConfig = field(default_factory=WandbConfig)


def register() -> None:
    """Make the schema known to Hydra (idempotent; called when train.run is imported)."""
    ConfigStore.instance().store(name="train_schema", node=TrainStage)
