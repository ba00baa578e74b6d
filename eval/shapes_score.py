"""The shapes score: ``data.shapes_check.check`` on every saved PNG, per category and overall.

The checker is GenEval's rule engine (:mod:`data.geneval_rules`) over the shapes detector, the caption
turned into GenEval metadata. Overall = the mean of the category means (GenEval's convention,
``data.shapes_check.score``); ``accuracy`` = the share of all images that are correct.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eval.images import Unreadable, iter_images, warn_unreadable, write_per_image

PROTOCOL = ("data.shapes_check.check on the saved PNG (GenEval's rules over the shapes detector, the caption as "
            "GenEval metadata); overall = mean over categories of the share correct")


def check_images(run_dir: Path, records: Sequence[Mapping[str, Any]],
                 unreadable: Unreadable | None = None) -> list[dict[str, Any]]:
    """Per readable image: {idx, sample, category, correct}; unreadable ones go to ``unreadable``."""
    from data.shapes_check import check

    unreadable = Unreadable() if unreadable is None else unreadable
    out = []
    for r, image in iter_images(Path(run_dir), records, unreadable):
        res = check(image, r["prompt"])
        out.append({"idx": r["idx"], "sample": r.get("sample", 0), "category": res["category"],
                    "correct": bool(res["correct"])})
    return out


def shapes_scores(run_dir: Path, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``shapes_overall``, ``shapes_accuracy``, ``shapes_<category>`` of one run, and the unreadable count."""
    from data.shapes_check import score

    unreadable = Unreadable()
    checked = check_images(run_dir, records, unreadable)
    warn_unreadable("shapes", unreadable)
    if not checked:
        raise ValueError(f"{run_dir}: none of its {len(records)} images can be read; re-decode them")
    write_per_image(run_dir, "shapes", checked)
    per = score(checked)
    out: dict[str, Any] = {"shapes_overall": per.pop("overall")}
    out["shapes_accuracy"] = sum(c["correct"] for c in checked) / len(checked)
    out.update({f"shapes_{cat}": v for cat, v in per.items()})
    out["shapes_n_scored"] = len(checked)
    out.update(unreadable.summary("shapes"))
    return out


def shapes_metric(run: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``shapes`` metric of :mod:`eval.run` (``run``: an ``eval.run.RunData``)."""
    return shapes_scores(run.run_dir, run.records)
