"""The ``geneval`` metric: GenEval's rules (:mod:`data.geneval_rules`) over a detector, per image and per tag.

Each record's GenEval metadata line comes from ``<run_dir>/geneval/<idx:05d>/metadata.jsonl`` (written by
decoding with ``prompts=geneval``). Detectors: ``mask2former`` (transformers'
``Mask2FormerForUniversalSegmentation``, a COCO instance checkpoint, with CLIP zero-shot colour on the
masked crop over a grey background, as GenEval does) and ``shapes`` (:func:`data.shapes_check.detect`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from data.geneval_rules import COLORS, Detection, evaluate, score
from eval.images import Unreadable, iter_images, warn_unreadable, write_per_image

PROTOCOL = (
    "GenEval rules (djghosh13/geneval evaluate_images.py): detections above 0.3 (0.9 for counting), at most 16 "
    "per class, best first; colour by zero-shot CLIP (10 colours, GenEval's 3 templates) on the masked crop over "
    "a #999 background; position from box centres with GenEval's 0.1 margin; overall = mean of tag means. "
    "Detector: transformers' Mask2Former COCO-instance checkpoint (not mmdet's Mask2Former Swin-S, so numbers may "
    "differ from the official scorer) or the shapes detector."
)
DEFAULTS: dict[str, Any] = {
    "detector": "mask2former",  # or "shapes"
    "detector_model": "facebook/mask2former-swin-small-coco-instance",
    "color_model": "openai/clip-vit-large-patch14",
    "threshold": 0.3,
    "counting_threshold": 0.9,
    "max_objects": 16,
    "device": "auto",  # "auto": cuda when available, else cpu
}
DETECTORS = ("mask2former", "shapes")
TEMPLATES = ("a photo of a {c} {name}", "a photo of a {c}-colored {name}", "a photo of a {c} object")
GREY = (153, 153, 153)  # GenEval's bgcolor "#999"
# COCO labels of the HF / detectron2 checkpoints -> GenEval's object_names.txt (which renames three of them)
GENEVAL_NAMES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown geneval option(s) {unknown}; known: {sorted(DEFAULTS)} (fix eval.options.geneval)")
    opts = {**DEFAULTS, **options}
    if opts["detector"] not in DETECTORS:
        raise ValueError(f"geneval detector {opts['detector']!r} is not one of {DETECTORS}; the checkpoint goes in "
                         "eval.options.geneval.detector_model")
    return opts


def read_metadata(run_dir: Path, records: Sequence[Mapping[str, Any]]) -> dict[int, dict]:
    """idx -> GenEval metadata line of every record; one error naming the fix when any is missing or foreign."""
    out, missing = {}, []
    for r in records:
        idx = int(r["idx"])
        if idx in out:
            continue
        path = Path(run_dir) / "geneval" / f"{idx:05d}" / "metadata.jsonl"
        if not path.is_file():
            missing.append(path)
            continue
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        meta = json.loads(lines[0]) if lines else {}
        if meta.get("prompt", r["prompt"]) != r["prompt"]:
            raise ValueError(f"{path} is for the prompt {meta.get('prompt')!r}, but idx {idx} of the run is "
                             f"{r['prompt']!r}: the geneval/ folder belongs to another prompt set; decode again")
        out[idx] = meta
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of {run_dir} have no GenEval metadata (first: {missing[0]}); "
                                "decode with prompts=geneval (it writes geneval/<idx>/metadata.jsonl) and let it finish")
    return out


# ---------------------------------------------------------------------------------------------------
# Detectors


def _load(cls: Any, source: str, what: str) -> Any:
    try:  # the local cache first: no network round trip when the weights are there
        return cls.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        pass
    try:
        return cls.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"{what} {source!r} could not be loaded ({type(e).__name__}): download it once with `hf download "
            f"{source}` where there is network (it lands in the Hugging Face cache), or pass a local checkpoint "
            "folder in eval.options.geneval") from None


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ClipColors:
    """Zero-shot colour of detected objects (GenEval: 10 colours, 3 templates averaged per colour)."""

    def __init__(self, source: str, device: Any):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.model = _load(CLIPModel, source, "GenEval colour classifier (CLIP)").to(device).eval()
        self.tokenizer = _load(AutoTokenizer, source, "GenEval colour classifier tokenizer")
        self.processor = _load(AutoImageProcessor, source, "GenEval colour classifier image processor")
        self.device = device
        self._heads: dict[str, Any] = {}

    def _head(self, name: str) -> Any:
        """[D, 10]: per colour, the normalised mean of its normalised template embeddings."""
        import torch

        if name not in self._heads:
            texts = [t.format(c=c, name=name) for c in COLORS for t in TEMPLATES]
            tok = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
            with torch.no_grad():
                emb = _features(self.model.get_text_features(**tok))
            emb = torch.nn.functional.normalize(emb, dim=-1).view(len(COLORS), len(TEMPLATES), -1).mean(1)
            self._heads[name] = torch.nn.functional.normalize(emb, dim=-1).T
        return self._heads[name]

    def __call__(self, image: Any, dets: Sequence[Detection]) -> list[str]:
        import torch

        if not dets:
            return []
        crops = [masked_crop(image, d) for d in dets]
        pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.no_grad():
            feats = torch.nn.functional.normalize(_features(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        best = (feats @ self._head(dets[0].name)).argmax(-1)
        return [COLORS[int(i)] for i in best]


def _features(out: Any) -> Any:
    """transformers 5.x returns an output object from get_*_features (the projection in pooler_output)."""
    return out if hasattr(out, "shape") else out.pooler_output


def masked_crop(image: Any, det: Detection) -> Any:
    """The object over GenEval's grey background, cropped to its box (PIL)."""
    from PIL import Image

    if det.mask is not None:
        blank = Image.new("RGB", image.size, GREY)
        image = Image.composite(image, blank, Image.fromarray(det.mask.astype("uint8") * 255))
    x0, y0, x1, y1 = det.box
    return image.crop((int(x0), int(y0), max(round(x1), int(x0) + 1), max(round(y1), int(y0) + 1)))


class Mask2FormerDetector:
    """COCO instance segmentation with transformers' Mask2Former; boxes from the masks (as mmdet does)."""

    def __init__(self, source: str, color_source: str, device: Any, min_score: float):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        self.model = _load(Mask2FormerForUniversalSegmentation, source, "GenEval detector (Mask2Former)")
        self.model.to(device).eval()
        self.processor = _load(AutoImageProcessor, source, "GenEval detector image processor")
        self.names = {int(i): GENEVAL_NAMES.get(n, n) for i, n in self.model.config.id2label.items()}
        self.device, self.min_score = device, min_score
        self._color_source = color_source
        self._colors: ClipColors | None = None

    def detect(self, image: Any) -> list[Detection]:
        import numpy as np
        import torch

        inputs = self.processor(images=[image], return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model(**inputs)
        res = self.processor.post_process_instance_segmentation(
            out, threshold=self.min_score, target_sizes=[image.size[::-1]], return_binary_maps=True)[0]
        if not res["segments_info"]:
            return []
        masks = res["segmentation"].cpu().numpy().astype(bool)  # [N, H, W]
        dets = []
        for info, mask in zip(res["segments_info"], masks):
            ys, xs = np.nonzero(mask)
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            dets.append(Detection(self.names.get(int(info["label_id"]), str(info["label_id"])),
                                  float(info["score"]), box, mask))
        return dets

    def colors(self, image: Any, dets: Sequence[Detection]) -> list[str]:
        if self._colors is None:  # CLIP is loaded on the first colour clause
            self._colors = ClipColors(self._color_source, self.device)
        return self._colors(image, dets)


class ShapesDetector:
    """:func:`data.shapes_check.detect` (colours come with the detections)."""

    def detect(self, image: Any) -> list[Detection]:
        from data.shapes_check import detect

        return detect(image)


def load_detector(opts: Mapping[str, Any]) -> Any:
    if opts["detector"] == "shapes":
        return ShapesDetector()
    min_score = min(float(opts["threshold"]), float(opts["counting_threshold"]))
    return Mask2FormerDetector(opts["detector_model"], opts["color_model"], _device(opts["device"]), min_score)


# ---------------------------------------------------------------------------------------------------
# The metric


def geneval_metric(run: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """``geneval_overall``, ``geneval_<tag>``, ``geneval_n`` and the unreadable images of one run."""
    opts = _options(options)
    meta = read_metadata(run.run_dir, run.records)
    detector = load_detector(opts)
    rules = {k: opts[k] for k in ("threshold", "counting_threshold")} | {"max_objects": int(opts["max_objects"])}
    unreadable, rows = Unreadable(), []
    for r, image in iter_images(run.run_dir, run.records, unreadable):
        m = meta[int(r["idx"])]
        color_fn = partial(detector.colors, image) if hasattr(detector, "colors") else None
        correct, reason = evaluate(m, detector.detect(image), color_fn=color_fn, **rules)
        rows.append({"idx": r["idx"], "sample": r.get("sample", 0), "tag": m["tag"], "correct": correct,
                     "reason": reason})
    write_per_image(run.run_dir, "geneval", rows)
    warn_unreadable("geneval", unreadable)
    per = score(rows)
    out: dict[str, Any] = {"geneval_overall": per.pop("overall")}
    out.update({f"geneval_{tag}": v for tag, v in per.items()})
    out["geneval_n"] = len(rows)
    out.update(unreadable.summary("geneval"))
    return out
