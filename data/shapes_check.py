"""The shapes checker: GenEval's rules (:mod:`data.geneval_rules`) over a shapes detector, on pixels only.

The detector: nearest palette colour per pixel, connected components per colour, shape per component
by IoU with the circle / square / triangle that fills its bounding box; each component is a
:class:`Detection` (class = shape name, colour = palette colour, box, mask, score 1.0). A caption is
turned into GenEval metadata (:func:`caption_metadata`) and judged by the same rules as GenEval prompts.
All scores are 1.0, so the rules' tie order decides which objects a colour / position clause looks at:
larger area first, then the order of :func:`detect` (components by their box's top edge, then left edge).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from data.geneval_rules import Detection
from data.geneval_rules import evaluate as evaluate_rules
from data.geneval_rules import score as score_rules
from data.shapes import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    parse_caption,
    shape_mask,
)

COLOR_THRESHOLD = 90.0  # max RGB distance to the nearest palette colour; farther pixels count as background
MIN_AREA_PX = 64  # components smaller than this are specks (objects are 16 px: >= 128 px; a 4x4 code is 16 px)
MIN_SHAPE_IOU = 0.6  # a component matching no template this well is an unknown shape

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


def components(image) -> list[dict]:
    """Detected objects: [{shape, color, cx, cy, w, h, area, iou, box, mask}] in 64-px coordinates.

    Ordered by the box's top edge, then its left edge (the tie order of equal-area objects).
    """
    labels = classify_pixels(_as_array(image))
    found = []
    for k, colour in enumerate(COLORS, start=1):
        comp, _ = ndimage.label(labels == k)
        for i, sl in enumerate(ndimage.find_objects(comp), start=1):
            mask = comp[sl] == i
            area = int(mask.sum())
            if area < MIN_AREA_PX:
                continue
            shape, iou = _classify_shape(mask)
            ys, xs = sl
            full = np.zeros(labels.shape, dtype=bool)
            full[sl] = mask
            found.append({
                "shape": shape, "color": colour,
                "cx": (xs.start + xs.stop) / 2, "cy": (ys.start + ys.stop) / 2,
                "w": xs.stop - xs.start, "h": ys.stop - ys.start, "area": area, "iou": round(iou, 3),
                "box": (float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)), "mask": full,
            })
    return sorted(found, key=lambda o: (o["box"][1], o["box"][0]))


def _to_detection(o: dict) -> Detection:
    return Detection(o["shape"], 1.0, o["box"], o["mask"], o["color"])


def detect(image) -> list[Detection]:
    """The shapes detector (a ``Detector`` of :mod:`data.geneval_rules`): one Detection per component, in the
    coordinates of the 64-px canvas (larger images are read at 64 px), colour set."""
    return [_to_detection(o) for o in components(image)]


def caption_metadata(caption: str) -> dict:
    """A shapes caption as a GenEval metadata line {tag, include, exclude, prompt}.

    "a X" -> include X >= 1; a number n -> include n and exclude n + 1 (exactly n, GenEval's counting);
    a colour -> the clause's ``color``; "A rel B" -> include B, then A with ``position: [rel, 0]``.
    """
    spec = parse_caption(caption)
    phrases = spec.phrases[::-1] if spec.relation else spec.phrases
    include, exclude = [], []
    for p in phrases:
        clause = {"class": p.shape, "count": p.count or 1}
        if p.color:
            clause["color"] = p.color
        include.append(clause)
        if p.count is not None:
            exclude.append({"class": p.shape, "count": p.count + 1})
    if spec.relation:
        include[1]["position"] = [spec.relation, 0]
    return {"tag": spec.category, "include": include, "exclude": exclude, "prompt": caption}


def check(image, caption: str) -> dict:
    """Score an image against its caption from pixels: {"category", "correct", "reason", "found"}."""
    meta = caption_metadata(caption)
    found = components(image)
    correct, reason = evaluate_rules(meta, [_to_detection(o) for o in found])
    found = [{k: v for k, v in o.items() if k not in ("box", "mask")} for o in found]
    return {"category": meta["tag"], "correct": correct, "reason": reason, "found": found}


def score(results: Sequence[dict]) -> dict[str, float]:
    """Share correct per category (in CATEGORIES order) and "overall" = the mean of the category means."""
    per = score_rules([{"tag": r["category"], "correct": r["correct"]} for r in results])
    return {**{c: per[c] for c in CATEGORIES if c in per}, "overall": per["overall"]}
