"""``make decoders``: every decoder of the family on tiny / tiny_sjd2, one protocol, one table (issue 19).

Each row is a (model, decoder setting) decoded through the real decode stage on the 200 shapes prompts x
seeds 0, 1, 2 (600 images, CFG 3, batch 1: latency per image), scored by the eval stage (speed + shapes),
and compared image by image with its own model's AR on the same prompts and seeds
(:mod:`bench.decoder_report`: eval/compare.py's paired cluster bootstrap over prompts). Resumable:
finished images are kept, a row whose dirs are complete is not decoded again.

Rows are named in :data:`ROWS` (``--rows ar,sjd,scd_maximal,...``); ``--full`` names the rows decoded with
every seed, the others get ``--rest-seeds`` (the table states each row's image count). Dirs are decoded seed
by seed, so a run stopped early still has every row at its first seed; the report reads what is there. ``training_free`` and ``lossless`` are what the decoder is, the latter as
proven on the enumerable toy by the tests named in :data:`LOSSLESS_EVIDENCE`.

Usage::

    python -m bench.decoder_table [--rows ar,sjd,...] [--seeds 0,1,2] [--full ar,sjd,...
    --rest-seeds 0] [--limit N] [--jobs 2] [--out runs/decoders]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    """One table row: a decoder setting on a model; ``baseline``: the row of that model's AR."""

    label: str
    model: str
    decoder: str
    overrides: tuple[str, ...] = ()
    training_free: bool | None = True  # None: the AR reference of a fine-tuned model
    lossless: bool = True
    baseline: str = "ar"
    note: str = ""
    extra: dict = field(default_factory=dict, compare=False)


SJD2_PRESET = "sjd2_tiny"  # window 128, 5 denoising steps (conf/decoder/sjd2_tiny.yaml)
LOSSLESS_CLEAN = ("decoder.accept_only_clean_inputs=true",)

ROWS: dict[str, Row] = {r.label: r for r in [
    Row("ar", "tiny", "ar", note="reference"),
    Row("sjd", "tiny", "sjd", note="window 16"),
    Row("sjd_w64", "tiny", "sjd", ("decoder.window=64",), note="window 64 (SCD's SJD baseline)"),
    Row("scd_maximal", "tiny", "scd", note="window 64, maximal coupling"),
    Row("scd_gumbel", "tiny", "scd", ("decoder.coupling=gumbel",), note="window 64, Gumbel coupling"),
    Row("gsd", "tiny", "gsd", lossless=False, note="window 16, the code's group knobs"),
    Row("gsd_no_dist", "tiny", "gsd", ("decoder.group_d_thr=1e9",), lossless=False,
        note="window 16, no embedding-distance filter"),
    Row("ar_sjd2", "tiny_sjd2", "ar", training_free=None, baseline="ar_sjd2", note="reference of the fine-tune"),
    Row("sjd2", "tiny_sjd2", SJD2_PRESET, training_free=False, lossless=False, baseline="ar_sjd2",
        note="preset: window 128, 5 steps"),
    Row("sjd2_maximal", "tiny_sjd2", SJD2_PRESET, ("decoder.coupling=maximal",), False, False, "ar_sjd2",
        "preset + maximal coupling"),
    Row("sjd2_gumbel", "tiny_sjd2", SJD2_PRESET, ("decoder.coupling=gumbel",), False, False, "ar_sjd2",
        "preset + Gumbel coupling"),
    Row("sjd2_lossless", "tiny_sjd2", SJD2_PRESET, LOSSLESS_CLEAN, False, True, "ar_sjd2",
        "preset, accept_only_clean_inputs"),
    Row("sjd2_lossless_maximal", "tiny_sjd2", SJD2_PRESET, (*LOSSLESS_CLEAN, "decoder.coupling=maximal"), False, True,
        "ar_sjd2", "preset, accept_only_clean_inputs, maximal coupling"),
    Row("sjd2_lossless_gumbel", "tiny_sjd2", SJD2_PRESET, (*LOSSLESS_CLEAN, "decoder.coupling=gumbel"), False, True,
        "ar_sjd2", "preset, accept_only_clean_inputs, Gumbel coupling"),
]}
ROWS.update({r.label: r for r in [
    Row("sjd_pac", "tiny", "sjd_pac", note="window 64, K=3, D=3 (the code's defaults)"),
    Row("sjd_pac_k4", "tiny", "sjd_pac_k4", note="window 64, K=4, D=3 (the README's K)"),
]})
DEFAULT_ROWS = ("ar", "sjd", "sjd_w64", "scd_maximal", "scd_gumbel", "sjd_pac", "sjd_pac_k4", "gsd", "ar_sjd2", "sjd2",
                "sjd2_maximal", "sjd2_gumbel", "sjd2_lossless", "sjd2_lossless_maximal", "sjd2_lossless_gumbel")
LOSSLESS_EVIDENCE = {
    "ar": "reference", "sjd": "tests/test_ar_sjd.py, tests/test_batch.py", "sjd_w64": "as sjd",
    "scd_maximal": "tests/test_coupling.py::test_scd_is_lossless_*", "scd_gumbel": "tests/test_coupling.py::test_scd_*",
    "gsd": "tests/test_gsd.py: rejected by the chi-square test (lossy)", "gsd_no_dist": "lossy (as gsd)",
    "sjd2": "lossy by design (accepts noisy-input slots)", "sjd2_maximal": "lossy (as sjd2)",
    "sjd2_gumbel": "lossy (as sjd2)", "sjd2_lossless": "tests/test_sjd2.py, tests/test_batch.py",
    "sjd2_lossless_maximal": "tests/test_coupling.py::test_lossless_sjd2_*",
    "sjd2_lossless_gumbel": "tests/test_coupling.py::test_lossless_sjd2_*",
    "sjd_pac": "tests/test_sjd_pac.py (chi-square at B=1 and B=3, broken sibling test rejected)",
    "sjd_pac_k4": "as sjd_pac",
}


def resolve_rows(names: Sequence[str] | None) -> list[Row]:
    """The rows to run (default :data:`DEFAULT_ROWS`); every row's baseline is added in front."""
    wanted = list(names) if names else list(DEFAULT_ROWS)
    unknown = [n for n in wanted if n not in ROWS]
    if unknown:
        raise SystemExit(f"error: unknown row(s) {unknown} (pick from {sorted(ROWS)})")
    out: list[str] = []
    for n in wanted:
        for m in (ROWS[n].baseline, n):
            if m not in out:
                out.append(m)
    return [ROWS[n] for n in out]


def row_seeds(row: Row, seeds: Sequence[int], full: Sequence[str] | None, rest_seeds: Sequence[int]) -> list[int]:
    """A row's seeds: all of ``seeds`` for the rows in ``full`` (None: every row), else ``rest_seeds``."""
    return list(seeds) if full is None or row.label in full or row.label == row.baseline else list(rest_seeds)


def run_dir(out: Path, row: Row, seed: int) -> Path:
    return out / f"{row.label}_s{seed}"


def decode_overrides(row: Row, seed: int, out: Path, limit: int | None) -> list[str]:
    return [f"model={row.model}", f"decoder={row.decoder}", *row.overrides, "prompts=shapes", f"seed={seed}",
            f"out_dir={run_dir(out, row, seed)}", "progress=false", *([f"prompts.limit={limit}"] if limit else [])]


def decode_job(row: Row, seed: int, out: Path, limit: int | None) -> tuple[str, float]:
    """One (row, seed) through ``python -m decode`` (resumes where a previous run stopped); log beside it."""
    t0 = time.perf_counter()
    log = out / "logs" / f"{row.label}_s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(REPO)}
    with log.open("a") as fh:
        proc = subprocess.run([sys.executable, "-m", "decode", *decode_overrides(row, seed, out, limit)], cwd=REPO,
                              env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        raise SystemExit(f"error: decoding {row.label} seed {seed} failed (exit {proc.returncode}); see {log} and "
                         "re-run the same command (finished images are kept)")
    return f"{row.label}_s{seed}", time.perf_counter() - t0


def complete(path: Path, limit: int | None) -> bool:
    """A run dir holding every image of its prompt set (200 shapes prompts, or ``limit``)."""
    n = sum(1 for f in path.glob("samples*.jsonl") for line in f.read_text().splitlines() if line.strip())
    return n >= (limit or 200)


def decode_all(plan: Sequence[tuple[Row, int]], out: Path, limit: int | None, jobs: int) -> None:
    """Decode the (row, seed) dirs of ``plan`` not yet complete, seed by seed (every row gets its first seed first)."""
    todo = [(r, s) for r, s in plan if not complete(run_dir(out, r, s), limit)]
    print(f"[decoders] {len(todo)} of {len(plan)} (row, seed) dirs to decode, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for name, seconds in pool.map(lambda job: decode_job(*job, out, limit), todo):
            print(f"[decoders] {name}: decoded in {seconds:.0f} s", flush=True)


def decoded_seeds(row: Row, seeds: Sequence[int], out: Path) -> list[int]:
    """The seeds of ``row`` with a run dir holding images (a run cut short counts with the images it has)."""
    return [s for s in seeds if any(run_dir(out, row, s).glob("samples*.jsonl"))]


def score_all(rows: Sequence[Row], seeds: Sequence[int], out: Path) -> None:
    """``scores.json`` + ``per_image_shapes.jsonl`` of every run dir (the eval stage's speed and shapes metrics)."""
    from eval.run import SCORES_FILE, evaluate_run

    for r in rows:
        for s in decoded_seeds(r, seeds, out):
            d = run_dir(out, r, s)
            newest = max(f.stat().st_mtime for f in d.glob("samples*.jsonl"))
            if not (d / SCORES_FILE).is_file() or (d / SCORES_FILE).stat().st_mtime < newest:
                evaluate_run(d, ["speed", "shapes"])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=None, help=f"comma-separated rows (default: {','.join(DEFAULT_ROWS)} [+ sjd_pac])")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--full", default=None, help="rows decoded with every seed (default: all); the rest: --rest-seeds")
    ap.add_argument("--rest-seeds", default="0", help="seeds of the rows not in --full")
    ap.add_argument("--limit", type=int, default=None, help="first N prompts only (smoke runs)")
    ap.add_argument("--jobs", type=int, default=1, help="decode processes at once (1 thread each)")
    ap.add_argument("--out", default="runs/decoders", help="run dirs")
    ap.add_argument("--results", default=None, help="table stem (default bench/results/decoders_family-<date>)")
    ap.add_argument("--no-decode", action="store_true", help="only score and tabulate existing dirs")
    a = ap.parse_args(argv)
    rows = resolve_rows(a.rows.split(",") if a.rows else None)
    seeds = [int(s) for s in a.seeds.split(",")]
    out = (REPO / a.out) if not Path(a.out).is_absolute() else Path(a.out)
    full = a.full.split(",") if a.full else None
    rest = [int(s) for s in a.rest_seeds.split(",")]
    plan = [(r, s) for s in seeds for r in rows if s in row_seeds(r, seeds, full, rest)]
    if not a.no_decode:
        decode_all(plan, out, a.limit, a.jobs)
    score_all(rows, seeds, out)
    from bench.decoder_report import report

    stem = Path(a.results) if a.results else REPO / "bench" / "results" / f"decoders_family-{time.strftime('%Y%m%d')}"
    dirs = {r.label: [run_dir(out, r, s) for s in decoded_seeds(r, seeds, out)] for r in rows}
    print(report(rows, dirs, seeds, stem, LOSSLESS_EVIDENCE))


if __name__ == "__main__":
    main()
