"""What the eval stage checks before it writes anything: its counts and sizes, and a comparison (a refused
compare writes nothing: no ``scores.json``, no table), and where a comparison's tables go.

A comparison's tables never land in the runs' shared parent folder (``runs/`` holds other tables of
the user's): without ``table_dir`` they go to a new folder beside the compared dirs named after the
comparison, ``compare_<baseline>_vs_<runs>`` (:func:`comparison_dir`).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from core.config import check_count

# metric options that are counts (>= 1) or shares (in [0, 1]), by metric (conf/eval/*.yaml)
COUNT_OPTIONS = {"fid": ("batch_size",), "clip_score": ("batch_size",), "geneval": ("max_objects",)}
SHARE_OPTIONS = {"geneval": ("threshold", "counting_threshold")}


def check_numbers(cfg: Mapping[str, Any]) -> None:
    """The eval config's counts, sizes and shares, naming the option."""
    cmp = cfg.get("compare") or {}
    check_count("compare.n_boot", cmp.get("n_boot"), 1, meaning="bootstrap resamples")
    level = cmp.get("level")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"compare.level={level!r} must lie strictly between 0 and 1 (0.95: a 95% interval)")
    check_count("wandb.grid_images", (cfg.get("wandb") or {}).get("grid_images"), 1, meaning="images per run grid")
    options = (cfg.get("eval") or {}).get("options") or {}
    for metric, keys in COUNT_OPTIONS.items():
        for key in keys:
            if key in (options.get(metric) or {}):
                check_count(f"eval.options.{metric}.{key}", options[metric][key], 1)
    for metric, keys in SHARE_OPTIONS.items():
        for key in keys:
            value = (options.get(metric) or {}).get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value <= 1):
                raise ValueError(f"eval.options.{metric}.{key}={value!r} must lie in [0, 1] (a detection score)")


def _scores(run_dir: Path) -> dict[str, Any]:
    import json

    f = Path(run_dir) / "scores.json"
    return json.loads(f.read_text()).get("metrics", {}) if f.is_file() else {}


def comparison_dir(base_dirs: Sequence[Path], groups: Sequence[Sequence[Path]]) -> Path:
    """``<parent of the compared dirs>/compare_<baseline label>_vs_<run labels>``: the comparison's own folder."""
    from eval.compare import _labels

    rows = [[SimpleNamespace(run_dir=p) for p in g] for g in [*groups, base_dirs]]
    labels = _labels(rows)
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", f"compare_{labels[-1]}_vs_{'+'.join(labels[:-1])}")
    if len(slug) > 100:
        slug = slug[:90] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:8]
    parents = [os.path.dirname(os.path.abspath(p)) for g in [*groups, base_dirs] for p in g]
    return Path(os.path.commonpath(parents)) / slug


def check_comparison(groups: Sequence[Sequence[Any]], base: Sequence[Any], metrics: Sequence[str] | None,
                     n_boot: int, level: float, will_write: Callable[[Any, str], bool]) -> None:
    """Every refusal :func:`eval.compare.paired_comparison` would make, made before anything is scored:
    ``will_write(run, name)`` says whether this eval writes metric ``name``'s values for ``run``."""
    from eval.compare import (
        DEFAULT_METRICS,
        METRICS,
        SET_LEVEL,
        _available,
        _check_prompt_sets,
        _image_rows,
    )
    from eval.images import per_image_path
    from eval.rundata import check_not_self, check_seeds

    check_not_self(groups, base)
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level={level}, n_boot={n_boot}: use 0 < level < 1 and n_boot >= 1")
    _check_prompt_sets(groups, base)
    keys = []
    for group in [*groups, base]:
        check_seeds(group)
        keys.append({(run.config.get("seed"), int(r["idx"]), int(r.get("sample", 0))) for run in group
                     for r in run.records})
    for group, k in zip(groups, keys):
        if not k & keys[-1]:
            raise ValueError(f"{[str(r.run_dir) for r in group]} and the baseline {[str(r.run_dir) for r in base]} "
                             "share no image (seed, idx, sample): decode both with the same prompts and seed=...")
    if metrics is None:
        metrics = [m for m in DEFAULT_METRICS if _available([*groups, base], m, will_write)]
    for m in metrics:
        if m not in METRICS and m not in SET_LEVEL:
            raise ValueError(f"cannot compare metric {m!r}; known: {sorted(METRICS) + sorted(SET_LEVEL)}")
        for run in [r for g in [*groups, base] for r in g]:
            if m in SET_LEVEL:
                if not will_write(run, m) and m not in _scores(run.run_dir):
                    raise ValueError(f"{run.run_dir} has no {m} in scores.json and this eval does not score it: add "
                                     f"{m} to eval.metrics or drop it from compare.metrics")
                continue
            source = METRICS[m]
            if source.file is None:
                _image_rows(run, m, source)  # the records' own refusals (no speed fields, batched latency)
            elif not per_image_path(run.run_dir, source.file).is_file() and not will_write(run, source.file):
                raise ValueError(f"{run.run_dir} has no {per_image_path(run.run_dir, source.file).name} (needed by "
                                 f"{m}) and this eval does not score {source.file}: add {source.file} to eval.metrics "
                                 f"(e.g. eval=shapes_coco) or drop {m} from compare.metrics")
