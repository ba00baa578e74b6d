"""Side-by-side tables of run scores: rows = run dirs (model, decoder, key options), columns = metrics.

``build_table`` turns ``scores.json`` objects into a header and rows of raw values; ``to_markdown``,
``to_csv`` and ``to_latex`` only format. Option columns show the decoder / sampling settings that
differ between the rows (plus window and denoise_steps whenever a row has them).
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

KEY_OPTIONS = ("window", "denoise_steps")  # decoder options always shown when present
METRIC_ORDER = ("step_compression", "n_forwards_mean", "latency_mean_s", "latency_median_s", "latency_speedup",
                "batch_size", "throughput_img_s", "throughput_speedup",
                "peak_mem_mib", "fid", "clip_score", "geneval_overall", "shapes_overall", "shapes_accuracy")
HIDDEN_METRICS = {"n_tokens_mean", "peak_mem_bytes"}
HIDDEN_SUFFIXES = ("_n_scored", "_n")  # counts of scored images: n_images / of_n say it (scores.json keeps them)


def _varying(values: list[Any]) -> bool:
    return len({repr(v) for v in values}) > 1


def _option_columns(scores: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(column name, section, key) of the settings worth a column."""
    cols = []
    dec_keys = sorted({k for s in scores for k in s["decoder_options"]})
    for k in dec_keys:  # among the runs that have the option (AR has no window: that is not variation)
        vals = [s["decoder_options"][k] for s in scores if k in s["decoder_options"]]
        if k in KEY_OPTIONS or _varying(vals):
            cols.append((k, "decoder_options", k))
    for k in sorted({k for s in scores for k in s["sampling"]}):  # a render run has no sampling: not variation
        if _varying([s["sampling"][k] for s in scores if k in s["sampling"]]):
            cols.append((k, "sampling", k))
    for k in ("prompts", "seed"):
        if _varying([s.get(k) for s in scores]):
            cols.append((k, "", k))
    return cols


def _ar_reference(s: Mapping[str, Any], scores: Sequence[Mapping[str, Any]], batch: int = 1) -> Mapping[str, Any] | None:
    """The AR run with the same model, prompts, seed and sampling as ``s``, decoded at batch size ``batch``
    (None if absent)."""
    for r in scores:
        if (r["decoder"] == "ar" and all(r.get(k) == s.get(k) for k in ("model", "prompts", "seed", "sampling"))
                and r["metrics"].get("batch_size", 1) == batch):
            return r
    return None


def _metrics_with_derived(s: Mapping[str, Any], scores: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    m = dict(s["metrics"])
    if m.get("peak_mem_bytes") is not None:
        m["peak_mem_mib"] = m["peak_mem_bytes"] / 2**20
    ref = _ar_reference(s, scores)
    if ref is not None and "latency_mean_s" in m and "latency_mean_s" in ref["metrics"]:
        m["latency_speedup"] = ref["metrics"]["latency_mean_s"] / m["latency_mean_s"]
    same = _ar_reference(s, scores, m.get("batch_size", 1))  # throughput: over AR at the same batch size
    if same is not None and m.get("throughput_img_s") and same["metrics"].get("throughput_img_s"):
        m["throughput_speedup"] = m["throughput_img_s"] / same["metrics"]["throughput_img_s"]
    return m


def _run_labels(scores: Sequence[Mapping[str, Any]]) -> list[str]:
    paths = [os.path.abspath(s["run_dir"]) for s in scores]
    if len(paths) == 1:
        return [os.path.basename(paths[0])]
    root = os.path.commonpath(paths)
    return [os.path.relpath(p, root) for p in paths]


def build_table(scores: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """``scores.json`` objects -> (header, rows of raw values); metric columns in a fixed order."""
    option_cols = _option_columns(scores)
    metrics = [_metrics_with_derived(s, scores) for s in scores]
    # first-seen order; numbers only (protocol strings and per-file lists stay in scores.json)
    present = [k for k in dict.fromkeys(k for m in metrics for k, v in m.items()
                                        if v is not None and not isinstance(v, (str, list, dict)))
               if k not in HIDDEN_METRICS and not k.endswith(HIDDEN_SUFFIXES)
               and not (k.endswith("_n_unreadable") and not any(m.get(k) for m in metrics))]  # shown when > 0
    metric_cols = [k for k in METRIC_ORDER if k in present] + [k for k in present if k not in METRIC_ORDER]
    counts = ["n_images"] + (["of_n"] if any(s.get("n_prompts_images") for s in scores) else [])
    header = ["run", "model", "decoder"] + [c[0] for c in option_cols] + counts + metric_cols
    rows = []
    for label, s, m in zip(_run_labels(scores), scores, metrics):
        opts = [(s[sec] if sec else s).get(key) for _, sec, key in option_cols]
        n = [s["n_images"]] + ([s.get("n_prompts_images")] if len(counts) > 1 else [])
        rows.append([label, s["model"], s["decoder"], *opts, *n, *[m.get(k) for k in metric_cols]])
    return header, rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def to_markdown(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def to_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV with raw (full-precision) values; empty cells for missing ones."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buf.getvalue()


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"), ("$", r"\$")):
        text = text.replace(a, b)
    return text


def to_latex(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A booktabs ``tabular`` (text left-aligned, numbers right-aligned)."""
    rows = [list(r) for r in rows]
    align = "".join("r" if rows and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) else "l"
                    for i in range(len(header)))
    lines = [rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(_tex_escape(h) for h in header) + r" \\",
             r"\midrule"]
    lines += [" & ".join(_tex_escape(_fmt(v)) for v in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def select_columns(header: Sequence[str], rows: Sequence[Sequence[Any]],
                   keep: Iterable[str]) -> tuple[list[str], list[list[Any]]]:
    """The table cut to the columns in ``keep`` (in the table's order; absent names are ignored)."""
    keep = set(keep)
    idx = [i for i, h in enumerate(header) if h in keep]
    return [header[i] for i in idx], [[r[i] for i in idx] for r in rows]


FORMATS = {"md": to_markdown, "csv": to_csv, "tex": to_latex}


def write_tables(header: Sequence[str], rows: Sequence[Sequence[Any]], stem: Path,
                 formats: Iterable[str] = ("md", "csv", "tex")) -> list[Path]:
    """Write ``stem.md``, ``stem.csv``, ``stem.tex`` (those asked for); returns the paths."""
    from core.rundir import atomic_write_bytes

    out = []
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown table format {fmt!r}; known: {sorted(FORMATS)}")
        path = Path(f"{stem}.{fmt}")
        text = FORMATS[fmt](header, rows)
        atomic_write_bytes(path, (text if text.endswith("\n") else text + "\n").encode())
        out.append(path)
    return out
