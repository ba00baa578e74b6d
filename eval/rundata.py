"""A run dir as the eval stage reads it: its config and its records merged over shards (the metrics,
the tables and the comparison tool all start here)."""
from __future__ import annotations

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
