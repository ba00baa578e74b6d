"""A run dir as the eval stage reads it: its config and its records merged over shards (the metrics,
the tables and the comparison tool all start here), and the rules for grouping run dirs in a comparison."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from core.rundir import CONFIG_FILE, read_records, sample_files


@dataclass(frozen=True)
class RunData:
    """One run dir as eval sees it: its resolved config and its records merged over shards."""

    run_dir: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]  # sorted by (idx, sample); one per image


def load_run(run_dir: str | Path) -> RunData:
    """Config + records of a run dir, merged over its shard files (first record of an image wins)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a decode run dir (no {CONFIG_FILE}); run `python -m decode` first")
    config = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_FILE), resolve=False)
    merged: dict[tuple[int, int], dict] = {}
    for f in sample_files(run_dir):
        for r in read_records(f):
            merged.setdefault((int(r["idx"]), int(r.get("sample", 0))), r)
    if not merged:
        raise ValueError(f"{run_dir} has no finished images (no samples*.jsonl records); run decode first")
    return RunData(run_dir, config, [merged[k] for k in sorted(merged)])


def check_seeds(group: Sequence[Any]) -> None:
    """A row holds one run dir per seed."""
    seeds: dict[Any, Any] = {}
    for run in group:
        seed = run.config.get("seed")
        if seed in seeds:
            raise ValueError(f"{seeds[seed]} and {run.run_dir} both have seed {seed}: a row holds one run dir "
                             "per seed (list the setting's dirs decoded with different seed=...)")
        seeds[seed] = run.run_dir


def check_not_self(groups: Sequence[Sequence[Any]], base: Sequence[Any]) -> None:
    """Refuse a baseline dir that is also among the compared runs (it would pair every image with itself)."""
    base_dirs = {os.path.realpath(getattr(b, "run_dir", b)) for b in base}
    for i, group in enumerate(groups):
        same = [str(getattr(r, "run_dir", r)) for r in group if os.path.realpath(getattr(r, "run_dir", r)) in base_dirs]
        if same:
            raise ValueError(f"compare.runs[{i}] includes the baseline {same[0]}: a run compared with itself differs by "
                             "nothing; remove it from compare.runs (or pick another compare.baseline)")
