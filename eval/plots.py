"""Sweep plots: metrics (step compression, shapes score, ...) against a decoder option (matplotlib Agg, PNG).

One panel per metric, x = a decoder option (``window`` by default when it varies), one line per
(model, decoder, value of a second option such as ``denoise_steps``); runs without the x option (AR)
are drawn as dashed horizontal reference lines.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def save_figure(fig: Any, out_png: str | Path) -> Path:
    """Lay out, write (PNG, 120 dpi, folders made) and close a matplotlib figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


PREFERRED_X = ("window", "denoise_steps")
DEFAULT_METRICS = ("step_compression", "shapes_overall", "latency_mean_s")


def _numeric_varying_options(scores: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = sorted({k for s in scores for k, v in s["decoder_options"].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return [k for k in keys if len({s["decoder_options"].get(k) for s in scores if k in s["decoder_options"]}) > 1]


def _varying_flags(scores: Sequence[Mapping[str, Any]]) -> list[str]:
    """Non-numeric decoder options (bools, strings) that differ between runs of one decoder."""
    keys = sorted({k for s in scores for k, v in s["decoder_options"].items()
                   if isinstance(v, (bool, str)) or v is None})
    return [k for k in keys if len({repr(s["decoder_options"].get(k)) for s in scores
                                    if k in s["decoder_options"]}) > 1]


def pick_axes(scores: Sequence[Mapping[str, Any]], x: str | None = None,
              group: str | None = None) -> tuple[str | None, str | None]:
    """(x option, grouping option): given ones win, else the varying numeric decoder options, window first."""
    varying = _numeric_varying_options(scores)
    ordered = [k for k in PREFERRED_X if k in varying] + [k for k in varying if k not in PREFERRED_X]
    if x is None:
        x = ordered[0] if ordered else None
    if group is None:
        rest = [k for k in ordered if k != x]
        group = rest[0] if rest else None
    return x, group


def plot_sweep(scores: Sequence[Mapping[str, Any]], out_png: str | Path, x: str | None = None,
               group: str | None = None, metrics: Sequence[str] = DEFAULT_METRICS) -> Path | None:
    """Write the sweep plot; returns its path, or None when no decoder option varies (nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, group = pick_axes(scores, x, group)
    metrics = [m for m in metrics if any(s["metrics"].get(m) is not None for s in scores)]
    if x is None or not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    lines: dict[tuple, list[Mapping[str, Any]]] = {}
    baselines = [s for s in scores if x not in s["decoder_options"]]
    flags = _varying_flags(scores)  # e.g. accept_only_clean_inputs, init_levels: a line of their own
    for s in scores:
        if x in s["decoder_options"]:
            key = (s["model"], s["decoder"], s["decoder_options"].get(group) if group else None,
                   tuple(f"{k}={s['decoder_options'].get(k)}" for k in flags))
            lines.setdefault(key, []).append(s)
    for ax, metric in zip(axes[0], metrics):
        for i, ((model, decoder, g, flag), runs) in enumerate(sorted(lines.items(), key=lambda kv: repr(kv[0]))):
            by_x: dict[Any, list[float]] = {}
            for r in runs:
                if r["metrics"].get(metric) is not None:
                    by_x.setdefault(r["decoder_options"][x], []).append(r["metrics"][metric])
            if by_x:  # one point per setting: the mean over its runs (seeds), each run a small dot
                xs = sorted(by_x)
                label = " ".join([f"{model} {decoder}"] + ([f"{group}={g}"] if group else []) + list(flag))
                ax.plot(xs, [sum(by_x[v]) / len(by_x[v]) for v in xs], marker="o", label=label, color=f"C{i}")
                ax.scatter([v for v in xs for _ in by_x[v]], [y for v in xs for y in by_x[v]], s=8,
                           color=f"C{i}", alpha=0.4)
        for b in baselines:
            if b["metrics"].get(metric) is not None:
                ax.axhline(b["metrics"][metric], linestyle="--", color="grey", linewidth=1)
                ax.annotate(f"{b['model']} {b['decoder']}", (0.01, b["metrics"][metric]),
                            xycoords=("axes fraction", "data"), fontsize=7, color="grey")
        ax.set_xlabel(x)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the panels
    return save_figure(fig, out_png)


QUALITY_METRICS = ("fid", "clip_score", "geneval_overall", "shapes_overall")


def plot_quality_speed(scores: Sequence[Mapping[str, Any]], out_png: str | Path,
                       metrics: Sequence[str] = QUALITY_METRICS) -> Path | None:
    """Quality against step compression, one panel per quality metric (the paper tables as a picture).

    Each run is a labelled point; a run without speed fields (ground-truth renders) is a dashed line.
    Returns None when no run has a quality metric.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(s["metrics"].get(m) is not None for s in scores)]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for s in scores:
            y, x = s["metrics"].get(metric), s["metrics"].get("step_compression")
            if y is None:
                continue
            label = f"{s['model']} {s['decoder']}"
            if x is None:
                ax.axhline(y, linestyle="--", color="grey", linewidth=1)
                ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), fontsize=7, color="grey")
            else:
                ax.scatter([x], [y], s=28)
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("step compression (tokens / forward)")
        ax.set_title(metric + (" (lower is better)" if metric == "fid" else ""))
        ax.grid(alpha=0.3)
    return save_figure(fig, out_png)


def plot_frontier(rows: Sequence[Mapping[str, Any]], out_png: str | Path, x_metric: str = "step_compression",
                  baseline_speed: float = 1.0) -> Path | None:
    """The speed / quality frontier of a comparison (eval.compare rows): x = each run's step compression,
    y = its paired quality difference to the baseline with the bootstrap interval, one panel per quality
    metric, each point labelled with its run. None when the rows hold no speed or no quality metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = {r["run"]: r["value"] for r in rows if r["metric"] == x_metric and r.get("value") is not None}
    metrics = [m for m in QUALITY_METRICS if any(r["metric"] == m and r["run"] in speed for r in rows)]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.0 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, r in enumerate(r for r in rows if r["metric"] == metric and r["run"] in speed):
            x, d = speed[r["run"]], r["diff"]
            err = None if r["ci_low"] is None else [[max(d - r["ci_low"], 0.0)], [max(r["ci_high"] - d, 0.0)]]
            holds = r["ci_low"] is not None and r["ci_low"] <= 0.0 <= r["ci_high"]
            ax.errorbar([x], [d], yerr=err, fmt="o", capsize=3, color="C0" if holds else "C3")
            ax.annotate(str(r["run"]), (x, d), fontsize=6, xytext=(4, 2 - 8 * (i % 2)), textcoords="offset points")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.plot([baseline_speed], [0.0], marker="s", color="black")
        ax.annotate(str(rows[0].get("baseline_run", "baseline")), (baseline_speed, 0.0), fontsize=6,
                    xytext=(4, -9), textcoords="offset points")
        ax.set_xlabel(f"{x_metric} (baseline {baseline_speed:g})")
        ax.set_ylabel(f"{metric}: run - baseline" + (" (lower is better)" if metric == "fid" else ""))
        ax.set_title(f"{metric} vs {x_metric}; blue: {rows[0].get('level', 0.95):.0%} interval holds 0", fontsize=9)
        ax.grid(alpha=0.3)
    return save_figure(fig, out_png)
