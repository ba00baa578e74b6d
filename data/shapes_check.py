"""The shapes checker (GenEval's rules on :mod:`data.shapes` images), apart from the world it reads.

``check`` reads pixels only: nearest palette colour per pixel, connected components per colour,
shape per component by IoU with the circle / square / triangle that fills its bounding box, then the
caption's spec is evaluated like GenEval ("a X": at least one; a number: exactly that many; a colour:
that many of the shape have the colour; a relation: some pair's centres satisfy it).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from data.shapes import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    Phrase,
    Spec,
    parse_caption,
    shape_mask,
)

COLOR_THRESHOLD = 90.0  # max RGB distance to the nearest palette colour; farther pixels count as background
MIN_AREA_PX = 64  # components smaller than this are specks (objects are 16 px: >= 128 px; a 4x4 code is 16 px)
MIN_SHAPE_IOU = 0.6  # a component matching no template this well is an unknown shape
RELATION_MARGIN_PX = 6.0  # centres must differ by this much along the relation's axis

_PALETTE = np.array([BACKGROUND] + list(COLORS.values()), dtype=np.float32)  # [1 + C, 3]; 0 = background


def _as_array(image) -> np.ndarray:
    """PIL image or uint8 array of any size -> uint8 [64, 64, 3] (nearest resampling)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
        if arr.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE):
            return arr.astype(np.uint8, copy=False)
        pil = Image.fromarray(arr.astype(np.uint8))
    if pil.size != (IMAGE_SIZE, IMAGE_SIZE):
        pil = pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST)
    return np.asarray(pil, dtype=np.uint8)


def classify_pixels(arr: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> int [H, W]: 0 background / unsure, 1 + k for the k-th colour of COLORS."""
    d2 = ((arr[:, :, None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)  # [H, W, 1 + C]
    label = d2.argmin(-1)
    label[d2.min(-1) > COLOR_THRESHOLD**2] = 0
    return label


def _classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Best (shape, IoU) of a component mask cropped to its bounding box."""
    h, w = mask.shape
    y = (np.arange(h, dtype=np.float32) + 0.5)[:, None]
    x = (np.arange(w, dtype=np.float32) + 0.5)[None, :]
    best, best_iou = "unknown", 0.0
    for shape in SHAPES:
        tmpl = shape_mask(shape, w / 2, h / 2, w, h, y, x)
        iou = float((tmpl & mask).sum() / max((tmpl | mask).sum(), 1))
        if iou > best_iou:
            best, best_iou = shape, iou
    return (best if best_iou >= MIN_SHAPE_IOU else "unknown"), best_iou


def detect(image) -> list[dict]:
    """Detected objects: [{shape, color, cx, cy, w, h, area, iou}] in 64-px coordinates."""
    labels = classify_pixels(_as_array(image))
    names = list(COLORS)
    found = []
    for k, colour in enumerate(names, start=1):
        comp, _ = ndimage.label(labels == k)
        for i, sl in enumerate(ndimage.find_objects(comp), start=1):
            mask = comp[sl] == i
            area = int(mask.sum())
            if area < MIN_AREA_PX:
                continue
            shape, iou = _classify_shape(mask)
            ys, xs = sl
            found.append({
                "shape": shape, "color": colour,
                "cx": (xs.start + xs.stop) / 2, "cy": (ys.start + ys.stop) / 2,
                "w": xs.stop - xs.start, "h": ys.stop - ys.start, "area": area, "iou": round(iou, 3),
            })
    return found


def _matches(p: Phrase, objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["shape"] == p.shape and (p.color is None or o["color"] == p.color)]


def relation_holds(a: dict, b: dict, relation: str) -> bool:
    """``a <relation> b`` between centres: offset along the axis > margin and dominant over the other axis."""
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]  # image y grows downwards
    axes = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}
    along, across = axes[relation]
    return along > RELATION_MARGIN_PX and along > abs(across)


def evaluate(spec: Spec, objs: list[dict]) -> bool:
    """GenEval-style decision of ``spec`` over detected objects."""
    groups = [_matches(p, objs) for p in spec.phrases]
    for p, g in zip(spec.phrases, groups):
        if (p.count is None and not g) or (p.count is not None and len(g) != p.count):
            return False
    if spec.relation is None:
        return True
    return any(relation_holds(a, b, spec.relation) for a in groups[0] for b in groups[1] if a is not b)


def check(image, caption: str) -> dict:
    """Score an image against its caption from pixels: {"category", "correct", "found"}."""
    spec = parse_caption(caption)
    found = detect(image)
    return {"category": spec.category, "correct": evaluate(spec, found), "found": found}


def score(results: Sequence[dict]) -> dict[str, float]:
    """Mean correctness overall and per category (GenEval reports the mean of the category means)."""
    per = {c: [r["correct"] for r in results if r["category"] == c] for c in CATEGORIES}
    out = {c: float(np.mean(v)) for c, v in per.items() if v}
    out["overall"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out
