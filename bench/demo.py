"""``make demo``: the papers' Table 1 in miniature on the embedded models, through the real stages.

Decodes the first ``n`` shapes eval prompts (categories are interleaved, so 12 = 2 per category) with
``ar`` and ``sjd`` on ``model=tiny`` and, when ``conf/model/tiny_sjd2.yaml`` loads, ``ar`` and ``sjd2`` on
``tiny_sjd2``; each row is a run dir under ``runs/demo/`` written by :func:`decode.run.decode_run` and
scored by :func:`eval.run.evaluate_run`. Prints the comparison table (step compression, latency,
speed-up over AR, shapes score) and writes ``runs/demo/grid.png`` (rows = decoders, columns = prompts).
"""
from __future__ import annotations

import argparse
import shutil
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.config import compose_config
from core.rundir import CONF_DIR
from decode.run import decode_run

TABLE1_ROWS: tuple[tuple[str, str], ...] = (("tiny", "ar"), ("tiny", "sjd"), ("tiny_sjd2", "ar"), ("tiny_sjd2", "sjd2_tiny"))
OPTIONAL_MODELS = ("tiny_sjd2",)  # rows of these models are dropped (with a note) when they do not load
DEMO_COLUMNS = ("model", "decoder", "window", "n_images", "step_compression", "n_forwards_mean", "latency_mean_s",
                "latency_speedup", "shapes_overall")


def load_models(rows: Sequence[tuple[str, str]], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """One adapter per model of ``rows``; an optional model that is missing or fails to load is skipped."""
    from models import load_adapter

    adapters: dict[str, Any] = {}
    for model in dict.fromkeys(m for m, _ in rows):
        if not (CONF_DIR / "model" / f"{model}.yaml").is_file() and model in OPTIONAL_MODELS:
            print(f"skipping model={model}: conf/model/{model}.yaml does not exist")
            continue
        cfg = compose_config([f"model={model}", *overrides]).model
        try:
            adapters[model] = load_adapter(cfg)
        except (FileNotFoundError, OSError) as e:
            if model not in OPTIONAL_MODELS:
                raise
            print(f"skipping model={model}: {e}")
    return adapters


def row_dir(out_root: Path, model: str, decoder: str) -> Path:
    return out_root / f"{model}_{decoder}"


def run_rows(rows: Sequence[tuple[str, str]], adapters: dict[str, Any], n_prompts: int, seed: int,
             out_root: Path, overrides: Sequence[str] = ()) -> list[Path]:
    """Decode every row whose model loaded; returns the run dirs."""
    dirs = []
    for model, decoder in rows:
        if model not in adapters:
            continue
        out = row_dir(out_root, model, decoder)
        cfg = compose_config([f"model={model}", f"decoder={decoder}", "prompts=shapes", f"prompts.limit={n_prompts}",
                              f"seed={seed}", f"out_dir={out}", *overrides])
        t0 = time.perf_counter()
        summary = decode_run(cfg, adapter=adapters[model])
        print(f"[demo] {model} {decoder}: {summary.n_decoded} images in {time.perf_counter() - t0:.1f} s -> {out}")
        dirs.append(out)
    return dirs


def write_grid(run_dirs: Sequence[Path], labels: Sequence[str], out_png: Path, n_cols: int | None = None) -> Path:
    """Images of the same prompts side by side: one row per run dir, captions as column titles.

    A green frame marks an image that ``data.shapes_check.check`` accepts, a red one an image it rejects.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from eval.run import load_run
    from eval.shapes_score import check_images

    runs = [load_run(d) for d in run_dirs]
    n_cols = n_cols or min(len(r.records) for r in runs)
    fig, axes = plt.subplots(len(runs), n_cols, figsize=(1.35 * n_cols + 0.8, 1.55 * len(runs) + 0.3), squeeze=False)
    for i, (run, label) in enumerate(zip(runs, labels)):
        records = run.records[:n_cols]
        verdicts = check_images(run.run_dir, records)
        for j, (rec, verdict) in enumerate(zip(records, verdicts)):
            ax = axes[i][j]
            with Image.open(run.run_dir / rec["image"]) as im:
                ax.imshow(im.convert("RGB"), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if verdict["correct"] else "tab:red")
                spine.set_linewidth(2.5)
            if i == 0:
                ax.set_title(textwrap.fill(rec["prompt"], 16), fontsize=6.5)
            if j == 0:
                ax.set_ylabel(label, fontsize=7.5)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def demo(n_prompts: int = 12, seed: int = 0, out_root: str | Path = "runs/demo", fresh: bool = True,
         rows: Sequence[tuple[str, str]] = TABLE1_ROWS, overrides: Sequence[str] = (),
         adapters: dict[str, Any] | None = None) -> tuple[list[dict], Path]:
    """Decode, score, print the table, write the grid; returns (scores per row, grid path)."""
    from eval.run import evaluate_run
    from eval.tables import build_table, select_columns, to_markdown, write_tables

    out_root = Path(out_root)
    adapters = load_models(rows, overrides) if adapters is None else adapters
    if fresh:  # the weights may have changed since the last demo: never reuse its images
        for model, decoder in rows:
            shutil.rmtree(row_dir(out_root, model, decoder), ignore_errors=True)
    dirs = run_rows(rows, adapters, n_prompts, seed, out_root, overrides)
    scores = [evaluate_run(d, ["speed", "shapes"]) for d in dirs]
    header, table = select_columns(*build_table(scores), DEMO_COLUMNS)
    print(to_markdown(header, table))
    write_tables(header, table, out_root / "table")
    labels = [f"{s['model']}\n{s['decoder']}" for s in scores]
    grid = write_grid(dirs, labels, out_root / "grid.png")
    print(f"[demo] wrote {grid} and {out_root / 'table'}.{{md,csv,tex}}")
    return scores, grid


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-prompts", type=int, default=12, help="first N shapes eval prompts (balanced)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--resume", action="store_true", help="keep the images of an earlier demo")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every row, e.g. sampling.top_k=8")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    demo(args.n_prompts, args.seed, args.out, fresh=not args.resume, overrides=args.overrides)
    print(f"[demo] total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
