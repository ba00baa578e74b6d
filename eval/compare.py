"""Paired comparison of runs against a baseline: per metric, the difference and its bootstrap interval.

Runs decoded with the same prompts and seeds draw the same image seed for the same (seed, idx, sample)
(:func:`core.rundir.image_seed`), so their images pair up; the paired difference cancels the prompt's
difficulty and the interval is much narrower than two separate intervals would suggest. A row may be a
*group* of run dirs of one setting decoded with different seeds (200 prompts x 3 seeds): each dir pairs
with the baseline group's dir of the same ``seed``.

Interval: a cluster bootstrap over prompts (the unit: an ``idx`` with all its samples and seeds, since
one prompt's images are correlated), drawn with replacement, the same draw for both runs; each
resample recomputes the metric's statistic exactly as its summary defines it (the mean over categories
/ tags of the share correct for ``shapes_overall`` / ``geneval_overall``, a plain mean over images for
the others); percentile interval. Images in one run but not the other are left out and counted. FID is
set-level and no per-image features are stored: its row carries the two values from ``scores.json``
and no interval.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval.images import per_image_path
from eval.rundata import check_not_self, check_seeds

PROTOCOL = ("paired by (seed, idx, sample); cluster bootstrap over prompts (idx), the same resample for run "
            "and baseline, each metric's summary statistic recomputed per resample; percentile interval")


@dataclass(frozen=True)
class Source:
    """Where a metric's per-image values live: ``per_image_<file>.jsonl`` (None: the decode records),
    the value of a row, and the row key whose mean of shares is the summary (None: a plain mean)."""

    file: str | None
    value: Callable[[Mapping[str, Any]], float]
    group: str | None = None


METRICS: dict[str, Source] = {
    "shapes_overall": Source("shapes", lambda r: float(r["correct"]), "category"),
    "shapes_accuracy": Source("shapes", lambda r: float(r["correct"])),
    "geneval_overall": Source("geneval", lambda r: float(r["correct"]), "tag"),
    "clip_score": Source("clip_score", lambda r: float(r["clip_score"])),
    "step_compression": Source(None, lambda r: r["n_tokens"] / r["n_forwards"]),
    "n_forwards_mean": Source(None, lambda r: float(r["n_forwards"])),
    "latency_mean_s": Source(None, lambda r: float(r["latency_s"])),
}
SET_LEVEL = {"fid": "FID is set-level and eval/fid.py stores no per-image features: difference without interval"}
LOWER_IS_BETTER = {"fid", "latency_mean_s", "latency_median_s", "n_forwards_mean"}
DEFAULT_METRICS = ("shapes_overall", "geneval_overall", "clip_score", "step_compression", "latency_mean_s")

Key = tuple[Any, int, int]  # (run seed, idx, sample)


# ---------------------------------------------------------------------------------------------------
# The math: pure numpy over paired arrays


def _mean_of_shares(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[B, G] sums and counts per resample and group -> [B]: the mean over groups of the share (a plain
    mean when G = 1); a group absent from a resample is skipped."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(sums / counts, axis=1)


def _per_prompt(prompt: np.ndarray, values: np.ndarray, groups: np.ndarray, n_prompts: int,
                n_groups: int) -> np.ndarray:
    """[P, 2G]: per prompt and group, the sum of the values, then the number of images."""
    out = np.zeros((n_prompts, 2 * n_groups))
    np.add.at(out, (prompt, groups), values)
    np.add.at(out, (prompt, n_groups + groups), 1.0)
    return out


def resample_weights(n_prompts: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_prompts]: how often each prompt is drawn in each resample (n_prompts draws, replacement)."""
    draws = np.random.default_rng(seed).integers(0, n_prompts, size=(n_boot, n_prompts))
    flat = (np.arange(n_boot)[:, None] * n_prompts + draws).ravel()
    return np.bincount(flat, minlength=n_boot * n_prompts).reshape(n_boot, n_prompts).astype(float)


def bootstrap_diff(prompt: Sequence[int], run: Sequence[float], base: Sequence[float],
                   run_groups: Sequence[int] | None = None, base_groups: Sequence[int] | None = None,
                   n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Paired arrays (one entry per image pair; ``prompt`` = the pair's cluster id 0..P-1, groups = int
    codes 0..G-1 of category / tag, None: a plain mean) -> value, baseline, diff and its percentile interval."""
    prompt = np.asarray(prompt, dtype=int)
    zeros = np.zeros(len(prompt), dtype=int)
    groups = [zeros if g is None else np.asarray(g, dtype=int) for g in (run_groups, base_groups)]
    n_prompts, n_groups = int(prompt.max()) + 1, int(max(g.max() for g in groups)) + 1
    # [P, 4G]: run sums | run counts | baseline sums | baseline counts: one product serves all resamples
    table = np.concatenate([_per_prompt(prompt, np.asarray(v, dtype=float), g, n_prompts, n_groups)
                            for v, g in ((run, groups[0]), (base, groups[1]))], axis=1)

    def stats(totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # [B, 4G] -> run [B], baseline [B]
        s_run, c_run, s_base, c_base = np.split(totals, 4, axis=1)
        return _mean_of_shares(s_run, c_run), _mean_of_shares(s_base, c_base)

    value, baseline = (float(x[0]) for x in stats(table.sum(0, keepdims=True)))
    boot_run, boot_base = stats(resample_weights(n_prompts, n_boot, seed) @ table)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(boot_run - boot_base, [alpha, 1.0 - alpha])
    return {"value": value, "baseline_value": baseline, "diff": value - baseline,
            "ci_low": float(low), "ci_high": float(high)}


def verdict(ci_low: float | None, ci_high: float | None) -> str | None:
    """"higher" / "lower" when the interval excludes 0, else "no difference" (None: no interval)."""
    if ci_low is None or ci_high is None:
        return None
    return "higher" if ci_low > 0 else "lower" if ci_high < 0 else "no difference"


# ---------------------------------------------------------------------------------------------------
# Reading run dirs


def _as_run(item: Any) -> Any:
    from eval.rundata import load_run

    return item if hasattr(item, "records") and hasattr(item, "run_dir") else load_run(item)


def _as_group(item: Any) -> list[Any]:
    """A row: one run dir (path or RunData-like) or a sequence of them (one per seed)."""
    if isinstance(item, (str, os.PathLike)) or hasattr(item, "run_dir"):
        return [_as_run(item)]
    return [_as_run(x) for x in item]


def _prompt_set(run: Any) -> tuple:
    p = run.config.get("prompts") or {}
    return p.get("name"), p.get("kind")


def _image_rows(run: Any, metric: str, source: Source) -> list[Mapping[str, Any]]:
    if source.file is None:
        if run.records and "n_forwards" not in run.records[0]:
            raise ValueError(f"{run.run_dir} has no speed fields in its records (not a decoded run); "
                             f"drop {metric} from the compared metrics")
        if metric.startswith("latency") and any(int(r.get("batch_size") or 1) > 1 for r in run.records):
            raise ValueError(f"{run.run_dir} was decoded in batches (batch_size > 1): its images have no batch-1 "
                             f"latency, so {metric} cannot be compared; decode with batch_size=1 for latency")
        return run.records
    path = per_image_path(run.run_dir, source.file)
    if not path.is_file():
        raise ValueError(f"{run.run_dir} has no {path.name} (needed by {metric}): run python -m eval on it "
                         f"first (run_dir={run.run_dir}, with the {source.file} metric)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def group_values(group: Sequence[Any], metric: str) -> dict[Key, tuple[float, Any]]:
    """{(seed, idx, sample): (value, group label)} over a row's run dirs; one dir per seed."""
    source, out = METRICS[metric], {}
    check_seeds(group)
    for run in group:
        seed = run.config.get("seed")
        for r in _image_rows(run, metric, source):
            key = (seed, int(r["idx"]), int(r.get("sample", 0)))
            out.setdefault(key, (source.value(r), r.get(source.group) if source.group else None))
    return out


def _label(group: Sequence[Any], root: str) -> str:
    paths = [os.path.abspath(r.run_dir) for r in group]
    common = paths[0] if len(paths) == 1 else os.path.commonpath(paths)
    if common == root and len(paths) > 1:
        stem = os.path.commonprefix([os.path.basename(p) for p in paths])
        if stem and {os.path.dirname(p) for p in paths} == {root}:  # one setting's seed dirs (..._s0, _s1, ...)
            return stem + "*"
        return "+".join(os.path.relpath(p, root) for p in paths)
    return os.path.relpath(common, root) if common != root else os.path.basename(common)


def _labels(groups: Sequence[Sequence[Any]]) -> list[str]:
    paths = [os.path.abspath(r.run_dir) for g in groups for r in g]
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    labels = [_label(g, root) for g in groups]
    clash = {x for x in labels if labels.count(x) > 1}
    return ["+".join(os.path.relpath(os.path.abspath(r.run_dir), root) for r in g) if x in clash else x
            for g, x in zip(groups, labels)]


# ---------------------------------------------------------------------------------------------------
# One row per (run, metric)


def _codes(labels: Sequence[Any], table: dict) -> list[int]:
    return [table.setdefault(x, len(table)) for x in labels]


def compare_metric(group: Sequence[Any], base: Sequence[Any], metric: str, n_boot: int = 10000,
                   seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """The paired comparison of one row's runs with the baseline's on one per-image metric."""
    a, b = group_values(group, metric), group_values(base, metric)
    keys = sorted(set(a) & set(b), key=repr)
    if not keys:
        raise ValueError(f"{[str(r.run_dir) for r in group]} and the baseline {[str(r.run_dir) for r in base]} share "
                         "no image (seed, idx, sample): decode both with the same prompts and seed=...")
    prompt_ids: dict[int, int] = {}
    for idx in sorted({k[1] for k in keys}):
        prompt_ids[idx] = len(prompt_ids)
    grouped = METRICS[metric].group is not None
    table: dict = {}
    res = bootstrap_diff([prompt_ids[k[1]] for k in keys], [a[k][0] for k in keys], [b[k][0] for k in keys],
                         _codes([a[k][1] for k in keys], table) if grouped else None,
                         _codes([b[k][1] for k in keys], table) if grouped else None, n_boot, seed, level)
    return {**res, "n_pairs": len(keys), "n_prompts": len(prompt_ids), "n_unpaired_run": len(a) - len(keys),
            "n_unpaired_baseline": len(b) - len(keys)}


def _set_level(group: Sequence[Any], base: Sequence[Any], metric: str) -> dict[str, Any]:
    """A set-level metric (FID): the mean over a row's dirs of ``scores.json``'s value, no interval."""
    def mean(g: Sequence[Any]) -> float:
        vals = []
        for run in g:
            f = Path(run.run_dir) / "scores.json"
            v = json.loads(f.read_text()).get("metrics", {}).get(metric) if f.is_file() else None
            if v is None:
                raise ValueError(f"{run.run_dir} has no {metric} in scores.json: run python -m eval on it first "
                                 f"(with the {metric} metric)")
            vals.append(float(v))
        return float(np.mean(vals))

    value, baseline = mean(group), mean(base)
    return {"value": value, "baseline_value": baseline, "diff": value - baseline, "ci_low": None, "ci_high": None,
            "n_pairs": None, "n_prompts": None, "n_unpaired_run": None, "n_unpaired_baseline": None,
            "note": SET_LEVEL[metric]}


def _available(groups: Sequence[Sequence[Any]], metric: str,
               will_write: Callable[[Any, str], bool] | None = None) -> bool:
    """Whether any dir can give ``metric`` (for the default list; a dir then lacking it is refused);
    ``will_write(run, file)``: the eval about to run writes that per-image file (eval/compare_checks.py)."""
    source = METRICS[metric]
    runs = [r for g in groups for r in g]
    if source.file is None:
        batched = metric.startswith("latency") and any(int(x.get("batch_size") or 1) > 1 for r in runs
                                                       for x in r.records)
        return not batched and all(r.records and "n_forwards" in r.records[0] for r in runs)
    return any(per_image_path(r.run_dir, source.file).is_file() or (will_write and will_write(r, source.file))
               for r in runs)


def _check_prompt_sets(groups: Sequence[Sequence[Any]], base: Sequence[Any]) -> None:
    want = _prompt_set(base[0])
    for run in [r for g in groups for r in g] + list(base):
        if _prompt_set(run) != want:
            raise ValueError(f"{run.run_dir} was decoded on prompts {_prompt_set(run)} (name, kind), the baseline "
                             f"{base[0].run_dir} on {want}: compare runs decoded with the same prompts=...")


def paired_comparison(runs: Sequence[Any], baseline: Any, metrics: Sequence[str] | None = None,
                      n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                      labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every run (a run dir / RunData, or a sequence of them, one per seed) against ``baseline`` (the same
    shape), per metric: value, baseline_value, diff = run - baseline, ci_low / ci_high of the diff at
    ``level``, verdict, n_pairs, n_prompts, unpaired counts. Values are over the paired images only
    (equal to the summaries when every image pairs). ``metrics`` None: those of :data:`DEFAULT_METRICS`
    the runs can give; ``fid`` gives a row without interval (:data:`SET_LEVEL`). ``seed`` seeds the
    resampling (the same draws for every metric). Rows in (run, metric) order."""
    base = _as_group(baseline)
    groups = [_as_group(r) for r in runs]
    if not groups:
        raise ValueError("no runs to compare: pass at least one run dir besides the baseline")
    check_not_self(groups, base)
    if labels is not None and len(labels) != len(groups):
        raise ValueError(f"{len(labels)} labels for {len(groups)} runs: give one label per run")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level={level}, n_boot={n_boot}: use 0 < level < 1 and n_boot >= 1")
    _check_prompt_sets(groups, base)
    if metrics is None:
        metrics = [m for m in DEFAULT_METRICS if _available(groups + [base], m)]
    for m in metrics:
        if m not in METRICS and m not in SET_LEVEL:
            raise ValueError(f"cannot compare metric {m!r}; known: {sorted(METRICS) + sorted(SET_LEVEL)}")
    all_labels = _labels(groups + [base])
    names, base_label = (list(labels) if labels is not None else all_labels[:-1]), all_labels[-1]
    rows = []
    for label, group in zip(names, groups):
        for m in metrics:
            res = _set_level(group, base, m) if m in SET_LEVEL else compare_metric(group, base, m, n_boot, seed, level)
            rows.append({"run": label, "run_dirs": [str(r.run_dir) for r in group],
                         "baseline_run": base_label, "baseline": [str(r.run_dir) for r in base], "metric": m, **res,
                         "verdict": verdict(res["ci_low"], res["ci_high"]), "lower_is_better": m in LOWER_IS_BETTER,
                         "level": level, "n_boot": n_boot})
    return rows


# ---------------------------------------------------------------------------------------------------
# Writers


def verdict_text(row: Mapping[str, Any]) -> str:
    """The table's verdict: "higher (better)", "lower (worse)", "no difference", or why none."""
    v = row.get("verdict")
    if v is None:
        return "no interval (set-level)"
    if v == "no difference":
        return v
    better = (v == "lower") == bool(row.get("lower_is_better"))
    return f"{v} ({'better' if better else 'worse'})"


TABLE_COLUMNS = ("run", "metric", "value", "baseline", "diff", "ci_low", "ci_high", "n_pairs", "n_prompts", "verdict")


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) for :func:`eval.tables.to_markdown` / ``to_csv`` / ``to_latex``."""
    out = []
    for r in rows:
        cells = {**r, "baseline": r["baseline_value"], "verdict": verdict_text(r)}
        out.append([cells.get(c) for c in TABLE_COLUMNS])
    return list(TABLE_COLUMNS), out


def plot_comparison(rows: Sequence[Mapping[str, Any]], out_png: str | Path) -> Path | None:
    """One panel per metric: each run's difference to the baseline with its interval, and the zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    if not metrics:
        return None
    runs = list(dict.fromkeys(r["run"] for r in rows))
    ncols = min(len(metrics), 3)
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, nrows * (1.6 + 0.35 * len(runs))),
                             squeeze=False, sharey=True)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics):
        for r in (r for r in rows if r["metric"] == metric):
            y, d = runs.index(r["run"]), r["diff"]
            err = None if r["ci_low"] is None else [[max(d - r["ci_low"], 0.0)], [max(r["ci_high"] - d, 0.0)]]
            ax.errorbar([d], [y], xerr=err, fmt="o", capsize=3, color="C0" if err is not None else "grey")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""), fontsize=9)
        ax.set_xlabel("run - baseline", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_yticks(range(len(runs)), runs)
    for ax in axes[:, 0]:
        ax.tick_params(axis="y", labelsize=8)
    axes[0][0].set_ylim(len(runs) - 0.5, -0.5)  # first run on top
    level = rows[0].get("level", 0.95)
    fig.suptitle(f"paired difference to {rows[0].get('baseline_run', 'the baseline')}, {level:.0%} bootstrap "
                 "interval over prompts", fontsize=9)
    from eval.plots import save_figure

    return save_figure(fig, out_png)


def write_comparison(rows: Sequence[Mapping[str, Any]], stem: str | Path,
                     formats: Sequence[str] = ("md", "csv", "tex"), plot: bool = True) -> list[Path]:
    """``stem.{md,csv,tex}``, ``stem.json`` (every field of every row), ``stem.png`` and, when the rows hold step
    compression and a quality metric, ``stem_frontier.png``; returns the paths."""
    from core.rundir import atomic_write_bytes
    from eval.tables import write_tables

    header, table = comparison_table(rows)
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    written = write_tables(header, table, Path(stem), formats)
    json_path = Path(f"{stem}.json")
    atomic_write_bytes(json_path, json.dumps({"protocol": PROTOCOL, "rows": list(rows)}, indent=1).encode())
    written.append(json_path)
    if plot:
        from eval.plots import plot_frontier

        base_speed = next((r["baseline_value"] for r in rows if r["metric"] == "step_compression"), 1.0)
        for png in (plot_comparison(rows, Path(f"{stem}.png")),
                    plot_frontier(rows, Path(f"{stem}_frontier.png"), baseline_speed=base_speed or 1.0)):
            if png is not None:
                written.append(png)
    return written
