"""GenEval's scoring rules (djghosh13/geneval, ``evaluation/evaluate_images.py``) over any detector.

A detector turns an image into :class:`Detection` s (class name, score, box, optional mask and colour);
:func:`evaluate` decides one image against its GenEval metadata line, :func:`score` summarises many.
The rules, as GenEval applies them:

- detections scoring above ``threshold`` (0.3; ``counting_threshold`` 0.9 when the tag is "counting")
  are kept, best first, at most ``max_objects`` (16) per class; equal scores keep the larger object
  first (mask area, else box area), then the detector's order;
- an include clause ``{class, count}`` needs at least ``count`` kept objects of the class; with a
  ``color`` the ``count`` best of them must all have that colour; with ``position: [relation, i]``
  each of them must stand in ``relation`` to every object clause ``i`` matched (the clause must have
  matched); an exact count is an include of n plus an exclude of n + 1;
- an exclude clause ``{class, count}`` fails when ``count`` or more objects of the class are kept;
- an image is correct when every clause holds; overall = the mean over tags of the share correct.

Relative position (GenEval's margin convention): the centre offset of A from B is shrunk on each axis
by ``position_margin`` (0.1) x the sum of the two box sizes on that axis, then divided by the length
of the unshrunk offset; "left of" when the x part is below -0.5, "right of" above 0.5, "above" /
"below" likewise on y (image y grows downwards).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_MARGIN = 0.1

ColorFn = Callable[[Sequence["Detection"]], Sequence[str]]  # detections of one class -> their colours


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected object: ``box`` = (x0, y0, x1, y1) in pixels, ``mask`` bool [H, W] when known."""

    name: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    color: str | None = None

    @property
    def area(self) -> float:
        if self.mask is not None:
            return float(self.mask.sum())
        x0, y0, x1, y1 = self.box
        return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


class Detector(Protocol):
    """What the rules need from a detector; colours may be left None and given by a ``ColorFn``."""

    def detect(self, image: Any) -> list[Detection]: ...


def check_metadata(metadata: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first malformed part of a GenEval metadata line."""
    def bad(why: str) -> ValueError:
        return ValueError(f"GenEval metadata {dict(metadata)!r}: {why} (see djghosh13/geneval "
                          "prompts/evaluation_metadata.jsonl for the format)")

    if "tag" not in metadata:
        raise bad("no 'tag'")
    include = metadata.get("include", [])
    for i, clause in enumerate(list(include) + list(metadata.get("exclude", []))):
        if "class" not in clause or int(clause.get("count", 0)) < 1:
            raise bad(f"clause {dict(clause)!r} needs a 'class' and a 'count' >= 1")
        if "color" in clause and clause["color"] not in COLORS:
            raise bad(f"colour {clause['color']!r} is not one of {COLORS}")
        if "position" in clause:
            relation, target = clause["position"]
            if relation not in RELATIONS or not (i < len(include) and 0 <= int(target) < i):
                raise bad(f"position {clause['position']!r} needs a relation in {RELATIONS} and the index "
                          "of an earlier include clause")


def keep(detections: Sequence[Detection], tag: str, threshold: float = THRESHOLD,
         counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
         ) -> dict[str, list[Detection]]:
    """The kept objects by class, best first (see the module docstring for the order of equal scores)."""
    cut = counting_threshold if tag == "counting" else threshold
    ranked = sorted((d for d in detections if d.score > cut), key=lambda d: (-d.score, -d.area))
    out: dict[str, list[Detection]] = {}
    for d in ranked:
        group = out.setdefault(d.name, [])
        if len(group) < max_objects:
            group.append(d)
    return out


def relations(a: Detection, b: Detection, margin: float = POSITION_MARGIN) -> set[str]:
    """The relations in which ``a`` stands to ``b`` (GenEval's margin convention)."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    off = ((ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2)
    size = ((ax1 - ax0) + (bx1 - bx0), (ay1 - ay0) + (by1 - by0))
    shrunk = [math.copysign(max(abs(o) - margin * s, 0.0), o) for o, s in zip(off, size)]
    if all(abs(s) < 1e-3 for s in shrunk):
        return set()
    dx, dy = (s / math.hypot(*off) for s in shrunk)
    found = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {r for r, holds in found.items() if holds}


def _colors(objs: Sequence[Detection], color_fn: ColorFn | None) -> list[str]:
    if all(o.color is not None for o in objs):
        return [str(o.color) for o in objs]
    if color_fn is None:
        raise ValueError("a colour clause needs the objects' colours: the detector leaves them unset and no "
                         "colour classifier was given (pass color_fn)")
    return list(color_fn(objs))


def evaluate(metadata: Mapping[str, Any], detections: Sequence[Detection], *, color_fn: ColorFn | None = None,
             threshold: float = THRESHOLD, counting_threshold: float = COUNTING_THRESHOLD,
             max_objects: int = MAX_OBJECTS, position_margin: float = POSITION_MARGIN) -> tuple[bool, str]:
    """(correct, reason) of one image: every clause of ``metadata`` over ``detections``; reason '' if correct."""
    check_metadata(metadata)
    objects = keep(detections, metadata["tag"], threshold, counting_threshold, max_objects)
    reasons: list[str] = []
    matched: list[list[Detection] | None] = []
    for clause in metadata.get("include", []):
        name, count = clause["class"], int(clause["count"])
        found = objects.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and "color" in clause:
            colors = _colors(found, color_fn)
            if colors.count(clause["color"]) < count:
                ok = False
                seen = ", ".join(f"{colors.count(c)} {c}" for c in dict.fromkeys(colors))
                reasons.append(f"expected {clause['color']} {name}>={count}, found {seen}")
        if ok and "position" in clause:
            relation, target = clause["position"][0], int(clause["position"][1])
            targets = matched[target]
            if targets is None:
                ok = False
                reasons.append(f"no target for {name} to be {relation}")
            else:
                for a in found:
                    wrong = [b for b in targets if relation not in relations(a, b, position_margin)]
                    if wrong:
                        ok = False
                        seen = " and ".join(sorted(relations(a, wrong[0], position_margin))) or "no relation to"
                        reasons.append(f"expected {name} {relation} target, found {seen} target")
                        break
        matched.append(found if ok else None)
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], int(clause["count"])
        if len(objects.get(name, [])) >= count:
            reasons.append(f"expected {name}<{count}, found {len(objects[name])}")
    return not reasons, "; ".join(reasons)


def score(results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """{tag: share correct} in order of first appearance, and "overall" = the mean of those shares."""
    per: dict[str, list[bool]] = {}
    for r in results:
        per.setdefault(r["tag"], []).append(bool(r["correct"]))
    out = {tag: float(np.mean(v)) for tag, v in per.items()}
    out["overall"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out
