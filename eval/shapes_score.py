"""The shapes score: ``data.shapes_check.check`` on every saved PNG, per category and overall.

The checker is GenEval's rule engine (:mod:`data.geneval_rules`) over the shapes detector, the caption
turned into GenEval metadata. Overall = the mean of the category means (GenEval's convention,
``data.shapes_check.score``); ``accuracy`` = the share of all images that are correct.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PROTOCOL = ("data.shapes_check.check on the saved PNG (GenEval's rules over the shapes detector, the caption as "
            "GenEval metadata); overall = mean over categories of the share correct")


def check_images(run_dir: Path, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per image: {idx, sample, category, correct}, read from ``run_dir / record["image"]``."""
    from PIL import Image

    from data.shapes_check import check

    out = []
    for r in records:
        path = Path(run_dir) / r["image"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {run_dir}/samples*.jsonl but missing: remove the line of "
                                    f"idx {r['idx']} from that file and re-run decode to redo the image")
        with Image.open(path) as im:
            res = check(im.convert("RGB"), r["prompt"])
        out.append({"idx": r["idx"], "sample": r.get("sample", 0), "category": res["category"],
                    "correct": bool(res["correct"])})
    return out


def shapes_scores(run_dir: Path, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``shapes_overall``, ``shapes_accuracy`` and ``shapes_<category>`` of one run."""
    from data.shapes_check import score

    checked = check_images(run_dir, records)
    per = score(checked)
    out = {"shapes_overall": per.pop("overall")}
    out["shapes_accuracy"] = sum(c["correct"] for c in checked) / len(checked)
    out.update({f"shapes_{cat}": v for cat, v in per.items()})
    return out


def shapes_metric(run: Any, options: Mapping[str, Any]) -> dict[str, float]:
    """The ``shapes`` metric of :mod:`eval.run` (``run``: an ``eval.run.RunData``)."""
    return shapes_scores(run.run_dir, run.records)
