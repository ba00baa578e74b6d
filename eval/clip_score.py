"""CLIP score: 100 x cos(CLIP image embedding, CLIP prompt embedding), per image and averaged.

The model is a ``transformers.CLIPModel`` with its ``CLIPProcessor`` (the OpenAI weights from the hub
or a local ``save_pretrained`` dir; ``shapes`` = the project's tiny CLIP, :mod:`models.shapes_clip`),
fed to ``torchmetrics.multimodal.CLIPScore`` through a callable. A thin wrapper records the embeddings
torchmetrics computes, so the per-image values and the unclamped mean come from the same forward passes
as torchmetrics' own value (which clamps the mean at 0).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.images import batches

DEFAULTS: dict[str, Any] = {
    "model": "openai/clip-vit-base-patch16",  # option: openai/clip-vit-large-patch14; a local dir; "shapes"
    "device": "cpu",
    "batch_size": 64,
    "scale": 100.0,  # fixed by torchmetrics; listed so that scores.json echoes it
}
SHAPES_MODEL = "shapes"  # -> models/weights/shapes_clip
PROGRESS_ABOVE = 200  # images; a tqdm bar for bigger runs

PROTOCOL = (
    "CLIP score = 100 x cos(image embedding, prompt embedding) (transformers CLIPModel projected pooler "
    "outputs); images through the checkpoint's own CLIPProcessor (shortest edge resize + centre crop, CLIP "
    "mean/std), prompts truncated to the text model's context (77 tokens for CLIP); clip_score = mean of "
    "the per-image values, unclamped (per_image_clip_score.jsonl); clip_score_torchmetrics = "
    "torchmetrics.multimodal.CLIPScore on the same images and prompts (mean clamped at 0); default model "
    "openai/clip-vit-base-patch16 (option openai/clip-vit-large-patch14; 'shapes' = the project's tiny "
    "CLIP trained on the shapes world, models/weights/shapes_clip)"
)


def resolve_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """DEFAULTS overlaid with ``options``; an unknown key or a scale other than 100 is an error."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown clip_score option(s) {unknown}; known: {sorted(DEFAULTS)} "
                         "(fix eval.options.clip_score in conf/eval/)")
    opts = {**DEFAULTS, **options}
    if float(opts["scale"]) != 100.0:
        raise ValueError(f"clip_score.scale={opts['scale']}: torchmetrics' CLIPScore fixes 100 x cosine; drop the option")
    return opts


# ---------------------------------------------------------------------------------------------------
# The model


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~"))


def load_clip(name: str):
    """(CLIPModel in eval mode, CLIPProcessor) of a hub id, a local checkpoint dir or ``shapes``.

    Missing weights raise one line naming the id / path and how to get them.
    """
    from transformers import CLIPModel, CLIPProcessor

    if name == SHAPES_MODEL:
        from models.shapes_clip import WEIGHTS_DIR
        source = str(WEIGHTS_DIR)
    else:
        source = name
    if _is_local(source):
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"clip_score: no CLIP checkpoint at {path} (needs config.json, model.safetensors and the processor "
                "files written by save_pretrained); `hf download openai/clip-vit-base-patch16 --local-dir DIR` "
                "then clip_score.model=DIR, or `python -m models.shapes_clip` for the shapes CLIP")
        source = str(path)
    try:
        return CLIPModel.from_pretrained(source).eval(), CLIPProcessor.from_pretrained(source)
    except (OSError, ValueError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"clip_score: cannot load CLIP {name!r} ({why}); fetch it on a machine with network with "
            f"`hf download {name} --local-dir DIR` (or `huggingface-cli download {name}`), then pass "
            "clip_score.model=DIR") from None


class _RecordingCLIP(torch.nn.Module):
    """The CLIPModel as torchmetrics expects it: ``get_*_features`` return tensors (transformers 5.x returns
    output objects), and every embedding returned is kept (in call order) for the per-image values."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config
        self.image_features: list[torch.Tensor] = []
        self.text_features: list[torch.Tensor] = []

    def get_image_features(self, pixel_values):
        out = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        self.image_features.append(out.detach().float().cpu())
        return out

    def get_text_features(self, input_ids, attention_mask=None):
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        self.text_features.append(out.detach().float().cpu())
        return out


class _TruncatingProcessor:
    """The CLIPProcessor with texts truncated to the model's context (torchmetrics pads only, and cutting a
    padded sequence would drop the end-of-text token the text tower pools at)."""

    def __init__(self, processor, max_length: int):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, *args, **kwargs):
        if kwargs.get("text") is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return self.processor(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Scoring


def score_images(model, processor, pairs: Iterable[tuple[Any, str]], device: str = "cpu",
                 batch_size: int = 64, total: int | None = None) -> tuple[np.ndarray, float]:
    """(100 x cos per (RGB PIL image, text) pair, unclamped; torchmetrics' CLIPScore over the same pairs)."""
    from torchmetrics.multimodal import CLIPScore
    from tqdm import tqdm

    recorder = _RecordingCLIP(model)
    wrapped = _TruncatingProcessor(processor, model.config.text_config.max_position_embeddings)
    metric = CLIPScore(model_name_or_path=lambda: (recorder, wrapped)).to(device)
    bar = tqdm(total=total, desc="clip_score", unit="img", disable=total is None or total <= PROGRESS_ABOVE)
    with torch.no_grad():
        for batch in batches(pairs, batch_size):
            images = [torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).to(device) for im, _ in batch]
            metric.update(images, [text for _, text in batch])
            bar.update(len(batch))
        bar.close()
        if not recorder.image_features:
            raise ValueError("clip_score: no image could be read, nothing to score")
        img = torch.nn.functional.normalize(torch.cat(recorder.image_features), dim=-1)
        txt = torch.nn.functional.normalize(torch.cat(recorder.text_features), dim=-1)
        per_image = (100.0 * (img * txt).sum(-1)).numpy()
        return per_image, float(metric.compute())


def clip_score_metric(run: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``clip_score`` metric of :mod:`eval.run` (``run``: an ``eval.run.RunData``)."""
    from eval.images import Unreadable, iter_images, warn_unreadable, write_per_image

    opts = resolve_options(options)
    device = str(opts["device"])
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"clip_score.device={device} but no CUDA device is visible; use clip_score.device=cpu")
    model, processor = load_clip(str(opts["model"]))
    unreadable = Unreadable()
    scored: list[Mapping[str, Any]] = []

    def pairs() -> Iterator[tuple[Any, str]]:
        for record, image in iter_images(run.run_dir, run.records, unreadable):
            scored.append(record)
            yield image, record["prompt"]

    per_image, tm_value = score_images(model, processor, pairs(), device, int(opts["batch_size"]), len(run.records))
    warn_unreadable("clip_score", unreadable)
    write_per_image(run.run_dir, "clip_score", _rows(scored, per_image))
    return {"clip_score": float(per_image.mean()), "clip_score_torchmetrics": tm_value,
            "clip_score_model": str(opts["model"]), "clip_score_n": len(per_image),
            **unreadable.summary("clip_score")}


def _rows(records: Sequence[Mapping[str, Any]], values: np.ndarray) -> list[dict[str, Any]]:
    return [{"idx": r["idx"], "sample": r.get("sample", 0), "clip_score": float(v)} for r, v in zip(records, values)]
