"""The table and plot of ``make decoders`` (:mod:`bench.decoder_table`): every row against its model's AR, paired
by (seed, prompt, sample) with eval/compare.py's cluster bootstrap over prompts (10,000 resamples, 95%
percentile interval), overall and per GenEval category; then the pairs the issue asks about (coupling vs
none, the best lossless decoder vs SJD and vs the SJD2 preset)."""
from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval.compare import PROTOCOL, bootstrap_diff, compare_metric, group_values

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
PAIRS = (("scd_maximal", "sjd_w64"), ("scd_gumbel", "sjd_w64"), ("scd_maximal", "sjd"), ("scd_gumbel", "sjd"),
         ("sjd_w64", "sjd"), ("gsd", "sjd"), ("gsd_no_dist", "sjd"), ("sjd_pac", "sjd"), ("sjd_pac_k4", "sjd"),
         ("sjd_pac_k4", "sjd_pac"), ("sjd2_maximal", "sjd2"),
         ("sjd2_gumbel", "sjd2"), ("sjd2_lossless_maximal", "sjd2_lossless"),
         ("sjd2_lossless_gumbel", "sjd2_lossless"), ("sjd2_lossless", "sjd2"))


def load_groups(dirs: Mapping[str, Sequence[Path]]) -> dict[str, list[Any]]:
    from eval.rundata import load_run

    return {label: [load_run(d) for d in ds] for label, ds in dirs.items()}


def category_diffs(group: Sequence[Any], base: Sequence[Any], n_boot: int = 10000) -> dict[str, dict[str, float]]:
    """Per category: the paired difference of the share correct and its interval (prompts resampled)."""
    a, b = group_values(group, "shapes_overall"), group_values(base, "shapes_overall")
    out = {}
    for c in CATEGORIES:
        keys = sorted((k for k in set(a) & set(b) if a[k][1] == c), key=repr)
        if not keys:
            continue
        ids = {idx: i for i, idx in enumerate(sorted({k[1] for k in keys}))}
        res = bootstrap_diff([ids[k[1]] for k in keys], [a[k][0] for k in keys], [b[k][0] for k in keys],
                             n_boot=n_boot)
        out[c] = {**res, "n_prompts": len(ids)}
    return out


def latency(group: Sequence[Any]) -> float:
    return float(np.mean([r["latency_s"] for run in group for r in run.records]))


def row_stats(row: Any, groups: Mapping[str, list[Any]]) -> dict[str, Any]:
    group, base = groups[row.label], groups[row.baseline]
    stats: dict[str, Any] = {"label": row.label, "model": row.model, "decoder": row.decoder,
                             "overrides": list(row.overrides), "note": row.note, "training_free": row.training_free,
                             "lossless": row.lossless, "baseline": row.baseline, "latency_s": latency(group),
                             "baseline_latency_s": latency(base),
                             "n_images": sum(len(r.records) for r in group)}
    if row.label == row.baseline:
        q = compare_metric(group, group, "shapes_overall")
        stats.update(step_compression={"value": 1.0, "ci_low": 1.0, "ci_high": 1.0},
                     shapes={"value": q["value"], "diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}, categories={})
        return stats
    sc = compare_metric(group, base, "step_compression")
    stats["step_compression"] = {"value": sc["value"], "ci_low": sc["baseline_value"] + sc["ci_low"],
                                 "ci_high": sc["baseline_value"] + sc["ci_high"]}
    stats["shapes"] = compare_metric(group, base, "shapes_overall")
    stats["latency_diff"] = compare_metric(group, base, "latency_mean_s")
    stats["categories"] = category_diffs(group, base)
    return stats


def pair_stats(groups: Mapping[str, list[Any]], a: str, b: str) -> dict[str, Any]:
    sc = compare_metric(groups[a], groups[b], "step_compression")
    q = compare_metric(groups[a], groups[b], "shapes_overall")
    return {"row": a, "vs": b, "step_compression": sc, "ratio": sc["value"] / sc["baseline_value"], "shapes": q}


def _ci(d: Mapping[str, Any], digits: int = 3, sign: bool = True) -> str:
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(d['diff'] if sign else d['value'])} [{f.format(d['ci_low'])}, {f.format(d['ci_high'])}]"


def _yn(v: bool | None) -> str:
    return "-" if v is None else "yes" if v else "no"


def _verdict(d: Mapping[str, Any]) -> str:
    return "lower" if d["ci_high"] < 0 else "higher" if d["ci_low"] > 0 else "no difference"


def markdown(stats: Sequence[Mapping[str, Any]], pairs: Sequence[Mapping[str, Any]], evidence: Mapping[str, str],
             header: str) -> str:
    sjd = next((s for s in stats if s["label"] == "sjd"), None)
    lines = [header, "", ("| row | model | setting | training-free | lossless | step compression [95% CI] | x SJD w16 | "
             "latency / image | speed-up vs its AR | images | shapes | diff to its AR [95% CI] | verdict |"),
             "|" + "---|" * 13]
    for s in stats:
        sc, q = s["step_compression"], s["shapes"]
        x_sjd = f"{sc['value'] / sjd['step_compression']['value']:.2f}x" if sjd else ""
        base = s["label"] == s["baseline"]
        lines.append(
            f"| `{s['label']}` | {s['model']} | {s['note']} | {_yn(s['training_free'])} | {_yn(s['lossless'])} | "
            f"{sc['value']:.2f}" + ("" if base else f" [{sc['ci_low']:.2f}, {sc['ci_high']:.2f}]") + f" | {x_sjd} | "
            f"{s['latency_s']:.2f} s | {s['baseline_latency_s'] / s['latency_s']:.2f}x | {s['n_images']} | {q['value']:.3f} | "
            + ("" if base else f"{_ci(q)} | {_verdict(q)}") + (" |" if not base else " |  |"))
    lines += ["", ("Per GenEval category: difference of the share correct to the model's AR [95% CI] (about 33 prompts x "
              "the row's seeds each); **bold** where the interval lies below 0 (the category pays for the speed)."), "",
              "| row | " + " | ".join(CATEGORIES) + " |", "|" + "---|" * (len(CATEGORIES) + 1)]
    for s in stats:
        if not s["categories"]:
            continue
        cells = []
        for c in CATEGORIES:
            d = s["categories"].get(c)
            cell = "" if d is None else _ci(d, 2)
            cells.append(f"**{cell}**" if d is not None and d["ci_high"] < 0 else cell)
        lines.append(f"| `{s['label']}` | " + " | ".join(cells) + " |")
    if pairs:
        lines += ["", "Pairs (same prompts and seeds, paired): step compression and shapes score of a row minus another.",
                  "", "| row | vs | step compression diff [95% CI] | ratio | shapes diff [95% CI] |", "|---|---|---|---|---|"]
        for p in pairs:
            lines.append(f"| `{p['row']}` | `{p['vs']}` | {_ci(p['step_compression'], 2)} | {p['ratio']:.2f}x | "
                         f"{_ci(p['shapes'])} |")
    lines += ["", "Lossless: " + "; ".join(f"`{s['label']}`: {evidence.get(s['label'], '')}" for s in stats)]
    return "\n".join(lines) + "\n"


def plot(stats: Sequence[Mapping[str, Any]], out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.plots import save_figure

    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    for i, s in enumerate(stats):
        sc, q = s["step_compression"], s["shapes"]
        colour = "C0" if s["lossless"] else "C3"
        marker = "o" if s["model"] == "tiny" else "s"
        ax.errorbar([sc["value"]], [q["diff"]], xerr=[[sc["value"] - sc["ci_low"]], [sc["ci_high"] - sc["value"]]],
                    yerr=[[q["diff"] - q["ci_low"]], [q["ci_high"] - q["diff"]]], fmt=marker, color=colour, capsize=3,
                    markerfacecolor="white" if s["training_free"] is False else colour)
        ax.annotate(s["label"], (sc["value"], q["diff"]), fontsize=7, xytext=(4, 3 - 9 * (i % 2)),
                    textcoords="offset points")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("step compression (tokens per forward), 95% CI")
    ax.set_ylabel("shapes score - its model's AR, 95% CI")
    ax.set_title("decoders on tiny (circles) / tiny_sjd2 (squares); blue: lossless, red: lossy; hollow: needs the "
                 "fine-tune", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, out_png)


def report(rows: Sequence[Any], dirs: Mapping[str, Sequence[Path]], seeds: Sequence[int], stem: Path,
           evidence: Mapping[str, str]) -> str:
    """Every row's statistics (``dirs``: a row label's run dirs, one per seed); write ``stem.md``, ``stem.json`` and
    ``stem.png``; return the Markdown."""
    groups = load_groups(dirs)
    stats = [row_stats(r, groups) for r in rows]
    labels = [r.label for r in rows]
    pairs = [pair_stats(groups, a, b) for a, b in PAIRS if a in labels and b in labels]
    lossless_free = [s for s in stats if s["lossless"] and s["training_free"] and s["label"] != s["baseline"]]
    if lossless_free:
        best = max(lossless_free, key=lambda s: s["step_compression"]["value"])["label"]
        pairs += [pair_stats(groups, best, b) for b in ("sjd", "sjd2")
                  if b in labels and b != best and (best, b) not in PAIRS]  # the best row vs SJD and SJD2, once
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    n = sum(len(g[0].records) for g in groups.values()) // max(len(groups), 1)
    header = (f"# The decoder family on one protocol (issue 19), {time.strftime('%Y-%m-%d')}, commit {commit}\n\n"
              f"Every row: `python -m bench.decoder_table` (`make decoders`): shapes prompts ({n} per seed) x seeds "
              f"{', '.join(map(str, seeds))}, CFG 3, temperature 1, batch 1, CPU, 1 thread per decode process; "
              f"scored by `python -m eval` (speed, shapes) and compared with its own model's AR: {PROTOCOL}; "
              "10,000 resamples, 95% interval. A row with fewer images (column *images*) was decoded with fewer "
              "seeds and is paired with its AR on the images they share. Latency: per image, one decode process "
              "at a time on a 2-core machine shared with other work: compare latencies in `make bench`, not here.")
    md = markdown(stats, pairs, evidence, header)
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text(md + f"\n![frontier]({stem.name}.png)\n")
    Path(f"{stem}.json").write_text(json.dumps({"protocol": PROTOCOL, "rows": stats, "pairs": pairs}, indent=1,
                                               default=str))
    plot(stats, Path(f"{stem}.png"))
    return md
