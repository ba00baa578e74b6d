"""What ``make eval-coco`` / ``make eval-geneval`` (bench/eval_suite.py) check before anything decodes:
its counts, and every path it takes (``COCO``, ``SJD2_PATH``, the GenEval prompts, ``--out``, and the
path options of the eval suite that scores the rows), so a typo fails in a second, not after the AR and
SJD rows have decoded for hours. A path that is missing is one line naming it and the fix.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.errors import UserError, one_line

COCO_FILES = {"coco2017_5k": 2017, "coco2014_30k": 2014}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``error: <what> (<fix>)``, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        import sys

        print(one_line(f"{message} (see python -m bench.eval_suite --help)"), file=sys.stderr)
        raise SystemExit(2)


def check_args(args: argparse.Namespace) -> None:
    """Counts and the paths given on the command line."""
    if args.limit is not None and args.limit < 1:
        raise UserError(f"LIMIT={args.limit} (--limit) must be an integer >= 1: the first N prompts (leave it out "
                        "for the whole set)")
    if args.nproc < 1:
        raise UserError(f"NPROC={args.nproc} (--nproc) must be an integer >= 1: decode processes, one per GPU")
    if args.set_name in COCO_FILES and args.coco:
        year = COCO_FILES[args.set_name]
        for need in (Path(args.coco) / "annotations" / f"captions_val{year}.json", Path(args.coco) / f"val{year}"):
            if not need.exists():
                raise UserError(f"COCO={args.coco} lacks {need}: pass the COCO root that holds annotations/"
                                f"captions_val{year}.json and val{year}/ (https://cocodataset.org/#download)")
    if args.set_name == "geneval":
        from data.prompts import GENEVAL_PATH

        if not GENEVAL_PATH.is_file():
            raise UserError(f"SET=geneval needs GenEval's prompts at {GENEVAL_PATH}: fetch them with "
                            "`make geneval-prompts`")
    if args.sjd2_path:
        path = Path(args.sjd2_path).expanduser()
        if not path.is_dir() or not (path / "sjd2.json").is_file():
            what = "does not exist" if not path.exists() else "holds no sjd2.json (not an SJD2 fine-tuning export)"
            raise UserError(f"SJD2_PATH={args.sjd2_path} {what}: pass the export dir of `make finetune` (its "
                            "train.export_dir, default runs/train/<model>-<recipe>/export)")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file: pass a folder for the rows' run dirs and the tables")


def _local(value: Any) -> Path | None:
    """A model option that names a local folder (absolute, ./ or ~/), None for a hub id or a built-in name."""
    text = str(value or "")
    return Path(text).expanduser() if text.startswith(("/", "./", "../", "~")) else None


def check_eval_config(cfg: Mapping[str, Any]) -> None:
    """The composed eval config (the suite that will score the rows): its numbers and its path options."""
    from eval.checks import check_numbers

    check_numbers(cfg)
    options = (cfg.get("eval") or {}).get("options") or {}
    metrics = (cfg.get("eval") or {}).get("metrics") or []
    fid = options.get("fid") or {}
    if "fid" in metrics and fid.get("features", "inception") == "inception":
        from eval.fid import inception_file, parse_options

        inception_file(parse_options(fid))  # FileNotFoundError naming the file and where to get it
    for metric, key in (("clip_score", "model"), ("geneval", "detector_model"), ("geneval", "color_model")):
        local = _local((options.get(metric) or {}).get(key)) if metric in metrics else None
        if local is not None and not local.exists():
            raise UserError(f"eval.options.{metric}.{key}={local} does not exist: pass an existing folder or a hub id")
