"""Typed config of the eval stage (``conf/eval.yaml`` extends :class:`EvalStage`), registered with
Hydra's ConfigStore: a wrong type (``formats=3``, ``plot.enabled=maybe``) fails while composing, naming
the option, before any run dir is read. The YAML holds every default a user sees."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class EvalSuite:
    """``conf/eval/<suite>.yaml``: which metrics, and their options by metric name."""

    name: str = MISSING
    metrics: list[str] = MISSING
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlotOptions:
    enabled: bool = True
    x: str | None = None
    group: str | None = None


@dataclass
class WandbOptions:
    """Where ``python -m eval`` logs its table and image grids (``mode: disabled`` logs nothing)."""

    mode: str = "disabled"  # online | offline | disabled
    project: str = "sjd2"
    entity: str | None = None
    name: str | None = None  # null: the table name
    grid_images: int = 16  # images per run in its grid

    def __post_init__(self) -> None:
        if self.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"wandb.mode={self.mode!r}: use online, offline or disabled")


@dataclass
class CompareOptions:
    """``compare.baseline`` set: every run of ``compare.runs`` against it, paired differences with bootstrap
    confidence intervals (eval/compare.py). Each entry: a run dir, a glob or a list (one dir per seed)."""

    baseline: Any = None
    runs: list[Any] = field(default_factory=list)
    metrics: list[str] | None = None  # null: every metric the runs have per-image values for
    n_boot: int = 10000
    level: float = 0.95
    seed: int = 0


@dataclass
class EvalStage:
    eval: EvalSuite = field(default_factory=EvalSuite)
    run_dir: str | None = None
    run_dirs: list[str] = field(default_factory=list)
    table_dir: str | None = None
    name: str = "scores"
    formats: list[str] = field(default_factory=lambda: ["md", "csv", "tex"])
    plot: PlotOptions = field(default_factory=PlotOptions)
    wandb: WandbOptions = field(default_factory=WandbOptions)
    compare: CompareOptions = field(default_factory=CompareOptions)
    allow_partial: bool = False  # score runs with fewer images than their prompt set


def register() -> None:
    """Make the schema known to Hydra (idempotent; called when eval.run is imported)."""
    ConfigStore.instance().store(name="eval_schema", node=EvalStage)
