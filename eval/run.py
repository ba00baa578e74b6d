"""The eval stage: run dirs -> ``scores.json`` each, plus one side-by-side table (Markdown, CSV, LaTeX).

Reads only the run-dir contract of :mod:`core.rundir` (config.yaml, samples*.jsonl, images/), so every
number can be recomputed from files. Metrics are looked up in :data:`METRICS` by the names listed in
``conf/eval/*.yaml``; a metric is a function ``fn(run: RunData, options: Mapping) -> dict[str, value]``
that lives in its own module and is imported on first use, so scorers that need big models (FID, CLIP,
GenEval) stay optional. To add one: write ``eval/<name>.py`` with ``<name>_metric(run, options)``, add
an entry below, list it in a ``conf/eval/*.yaml``.
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from core.errors import one_line_errors
from core.rundir import CONF_DIR, CONFIG_FILE, atomic_write_bytes, sample_files
from eval import checks, schema
from eval.rundata import RunData, load_run

SCORES_FILE = "scores.json"
schema.register()


@dataclass(frozen=True)
class Metric:
    """A named scorer: ``target`` = "module:function"; ``applies`` says whether a run can be scored.

    The module's ``PROTOCOL`` string (the choices behind the number) is stored next to the scores.
    """

    name: str
    target: str
    applies: Callable[[RunData], bool] = lambda run: True


def _prompt_kind(run: RunData) -> str | None:
    return run.config.get("prompts", {}).get("kind")


COCO_KINDS = ("coco_longest", "coco_sample", "shapes_coco")  # prompt sets whose records carry COCO image ids
SHAPES_KINDS = ("shapes", "shapes_coco")  # prompt sets of the shapes caption grammar

METRICS: dict[str, Metric] = {
    # runs of decoded images carry speed fields; a ground-truth render run (data/shapes_coco.py) does not
    "speed": Metric("speed", "eval.speed:speed_metric", applies=lambda run: "n_forwards" in run.records[0]),
    "shapes": Metric("shapes", "eval.shapes_score:shapes_metric", applies=lambda run: _prompt_kind(run) in SHAPES_KINDS),
    "fid": Metric("fid", "eval.fid:fid_metric", applies=lambda run: _prompt_kind(run) in COCO_KINDS),
    "clip_score": Metric("clip_score", "eval.clip_score:clip_score_metric"),
    # GenEval's prompts, or any run decoded with prompts.geneval_folder=true (e.g. shapes: its captions'
    # GenEval metadata, scored by the same rules over the shapes detector)
    "geneval": Metric("geneval", "eval.geneval:geneval_metric",
                      applies=lambda run: _prompt_kind(run) == "geneval" or (run.run_dir / "geneval").is_dir()),
}


def resolve_metric(name: str) -> tuple[Callable[[RunData, Mapping[str, Any]], dict[str, Any]], str]:
    """(scorer function, protocol text) of ``name``; an error naming the fix when unknown or not written yet."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {sorted(METRICS)} (fix eval.metrics in conf/eval/)")
    module, fn = METRICS[name].target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise ValueError(f"metric {name!r} is not available yet ({module.replace('.', '/')}.py is missing); "
                         "drop it from eval.metrics") from None
    return getattr(mod, fn), getattr(mod, "PROTOCOL", "")


# ---------------------------------------------------------------------------------------------------
# Reading run dirs


def _natural_key(path: str) -> list:
    """Sort ``w4`` before ``w16``: digit runs compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path)]


def expand_run_dirs(run_dir: str | None, run_dirs: Sequence[str] | None) -> list[Path]:
    """``run_dir`` and ``run_dirs`` (paths or globs) -> run dirs (those holding a config.yaml), in order."""
    patterns = ([run_dir] if run_dir else []) + list(run_dirs or [])
    if not patterns:
        raise ValueError("no run dir given: pass run_dir=DIR or run_dirs=[D1,D2] (globs allowed, e.g. 'runs/tiny/shapes/*')")
    out: list[Path] = []
    for pat in patterns:
        if glob.has_magic(str(pat)):  # a glob keeps only run dirs (tables and plots may sit beside them)
            hits = [h for h in sorted(glob.glob(str(pat)), key=_natural_key) if (Path(h) / CONFIG_FILE).is_file()]
        else:
            hits = [str(pat)]
        if not hits:
            raise FileNotFoundError(f"no run dir matches {pat!r}")
        out += [Path(h) for h in hits if Path(h) not in out]
    return out


# ---------------------------------------------------------------------------------------------------
# Scoring


class PartialRun(ValueError):
    """A run dir holds fewer images than its prompt set asks for."""


def expected_images(run: RunData) -> set[tuple[int, int]] | None:
    """(idx, sample) of every image the run's prompt set asks for; None when the set cannot be read."""
    from data.prompts import PromptSetError, load_prompts

    prompts_cfg = run.config.get("prompts") or {}
    if not prompts_cfg.get("kind"):
        return None
    try:
        prompts = load_prompts(prompts_cfg)
    except (PromptSetError, OSError):
        return None
    per = int(prompts_cfg.get("images_per_prompt") or 1)
    return {(p.idx, j) for p in prompts for j in range(per)}


def check_complete(run: RunData, allow_partial: bool = False) -> int | None:
    """The number of images the prompt set asks for; :class:`PartialRun` when some are missing."""
    want = expected_images(run)
    if want is None:
        return None
    missing = sorted(want - {(int(r["idx"]), int(r.get("sample", 0))) for r in run.records})
    if missing and not allow_partial:
        files = ", ".join(f.name for f in sample_files(run.run_dir))
        raise PartialRun(f"{run.run_dir} holds {len(want) - len(missing)} of {len(want)} images (first missing: "
                         f"idx {missing[0][0]}; records files: {files}); finish it by re-running its decode "
                         "command (it resumes, every shard), or pass allow_partial=true to score what is there")
    return len(want)


def run_summary(run: RunData) -> dict[str, Any]:
    """The settings a table row shows next to the numbers."""
    c = run.config
    decoder = dict(c.get("decoder", {}))
    return {
        "run_dir": str(run.run_dir),
        "model": c.get("model", {}).get("name"),
        "decoder": decoder.pop("name", None),
        "decoder_options": decoder,
        "sampling": c.get("sampling", {}),
        "prompts": c.get("prompts", {}).get("name"),
        "seed": c.get("seed"),
        "n_images": len(run.records),
    }


def score_run(run: RunData, metrics: Sequence[str], options: Mapping[str, Any] | None = None,
              allow_partial: bool = False) -> dict[str, Any]:
    """Every applicable metric of one run -> the ``scores.json`` object (settings, metrics, protocols)."""
    options = options or {}
    n_expected = check_complete(run, allow_partial)
    scores: dict[str, Any] = {}
    protocol: dict[str, Any] = {}
    skipped: list[str] = []
    for name in metrics:
        fn, text = resolve_metric(name)
        if not METRICS[name].applies(run):
            skipped.append(name)
            continue
        opts = dict(options.get(name) or {})
        scores.update(fn(run, opts))
        protocol[name] = {"protocol": text, "options": opts}
    env_files = sorted(run.run_dir.glob("env*.json"))
    env = json.loads(env_files[0].read_text()) if env_files else None
    return {**run_summary(run), "n_prompts_images": n_expected, "metrics": scores, "protocol": protocol,
            "skipped": skipped, "env": env}


def evaluate_run(run_dir: str | Path, metrics: Sequence[str], options: Mapping[str, Any] | None = None,
                 allow_partial: bool = False) -> dict[str, Any]:
    """Score one run dir and write its ``scores.json`` (atomically); returns the scores."""
    scores = score_run(load_run(run_dir), metrics, options, allow_partial)
    atomic_write_bytes(Path(run_dir) / SCORES_FILE, json.dumps(scores, indent=1).encode())
    return scores


def table_dir_for(run_dirs: Sequence[Path], table_dir: str | None) -> Path:
    """Where the tables go: ``table_dir``, else the run dir itself, else the run dirs' common parent (a
    comparison's: its own folder, :func:`eval.checks.comparison_dir`)."""
    if table_dir:
        return Path(table_dir)
    if len(run_dirs) == 1:
        return run_dirs[0]
    return Path(os.path.commonpath([str(p.resolve()) for p in run_dirs]))


def _comparison_groups(cmp: Mapping[str, Any]) -> tuple[list[Path], list[list[Path]]]:
    """(baseline dirs, one list of dirs per compared row) of ``compare:``; both empty without a baseline."""
    if not cmp.get("baseline"):
        if cmp.get("runs"):
            raise ValueError("compare.runs is set but compare.baseline is not: name the run to compare against")
        return [], []

    def dirs(entry: Any) -> list[Path]:
        return expand_run_dirs(None, entry if isinstance(entry, list) else [entry])

    if not cmp.get("runs"):
        raise ValueError("compare.baseline is set but compare.runs is empty: list the runs to compare with it")
    return dirs(cmp["baseline"]), [dirs(r) for r in cmp["runs"]]


def evaluate(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The stage: score every run dir, print the side-by-side table, write md/csv/tex (+ a sweep plot)."""
    from eval import plots, tables

    # typed once (eval/schema.py): a config from code gets the same checks and defaults as the command line
    cfg = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema.EvalStage), cfg), resolve=True)
    checks.check_numbers(cfg)
    metrics = list(cfg["eval"]["metrics"])
    for name in metrics:  # fail on a typo before scoring anything
        resolve_metric(name)
    cmp = cfg["compare"]
    base_dirs, groups = _comparison_groups(cmp)
    listed = [str(d) for d in base_dirs] + [str(d) for g in groups for d in g]
    run_dirs = expand_run_dirs(cfg.get("run_dir"), list(cfg.get("run_dirs") or []) + listed)
    runs = [load_run(d) for d in run_dirs]
    if base_dirs:  # a refused comparison writes nothing: every refusal it knows is made before scoring
        by_dir = {r.run_dir: r for r in runs}
        checks.check_comparison([[by_dir[d] for d in g] for g in groups], [by_dir[d] for d in base_dirs],
                                cmp["metrics"], cmp["n_boot"], cmp["level"],
                                lambda run, name: name in metrics and METRICS[name].applies(run))
    for run in runs:  # every run complete (or partial allowed) before any scoring starts
        check_complete(run, cfg["allow_partial"])
    all_scores = [evaluate_run(r.run_dir, metrics, cfg["eval"].get("options"), cfg["allow_partial"]) for r in runs]
    header, rows = tables.build_table(all_scores)
    out = checks.comparison_dir(base_dirs, groups) if base_dirs and not cfg.get("table_dir") else \
        table_dir_for(run_dirs, cfg.get("table_dir"))
    out.mkdir(parents=True, exist_ok=True)
    written = tables.write_tables(header, rows, out / cfg["name"], cfg["formats"])
    print(tables.to_markdown(header, rows))
    plot_cfg = cfg["plot"]
    if plot_cfg["enabled"] and len(all_scores) > 1:
        png = plots.plot_sweep(all_scores, out / f"{cfg['name']}_sweep.png", x=plot_cfg["x"], group=plot_cfg["group"])
        if png is not None:
            written.append(png)
        png = plots.plot_quality_speed(all_scores, out / f"{cfg['name']}_quality.png")
        if png is not None:
            written.append(png)
    if base_dirs:
        from eval.compare import comparison_table, paired_comparison, write_comparison

        rows_cmp = paired_comparison([g if len(g) > 1 else g[0] for g in groups],
                                     base_dirs if len(base_dirs) > 1 else base_dirs[0], cmp["metrics"],
                                     n_boot=cmp["n_boot"], seed=cmp["seed"], level=cmp["level"])
        written += write_comparison(rows_cmp, out / f"{cfg['name']}_compare", cfg["formats"], plot=plot_cfg["enabled"])
        print(tables.to_markdown(*comparison_table(rows_cmp)))
    if cfg["wandb"]["mode"] != "disabled":
        from eval.wandb_log import log_eval

        log_eval(cfg["wandb"], cfg["name"], header, rows, runs, out)
    print("wrote " + ", ".join(str(p) for p in written))
    return all_scores


@one_line_errors
def _evaluate_config(cfg: Any) -> None:
    evaluate(OmegaConf.to_container(cfg, resolve=True))


def main() -> None:
    """The Hydra command line of the stage (``python -m eval`` and ``python -m eval.run``)."""
    import hydra

    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")(_evaluate_config)()


if __name__ == "__main__":  # `python -m eval.run ...` == `python -m eval ...`
    main()
