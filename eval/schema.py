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
class EvalStage:
    eval: EvalSuite = field(default_factory=EvalSuite)
    run_dir: str | None = None
    run_dirs: list[str] = field(default_factory=list)
    table_dir: str | None = None
    name: str = "scores"
    formats: list[str] = field(default_factory=lambda: ["md", "csv", "tex"])
    plot: PlotOptions = field(default_factory=PlotOptions)


def register() -> None:
    """Make the schema known to Hydra (idempotent; called when eval.run is imported)."""
    ConfigStore.instance().store(name="eval_schema", node=EvalStage)
