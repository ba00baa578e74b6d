"""Speed metrics from the per-image records (DESIGN.md section 8): pure math over ``samples.jsonl`` rows.

Step compression is the papers' *mean of ratios*: the mean over images of ``n_tokens / n_forwards``
(not total tokens over total forwards). Latency is per image, batch 1, generation only (the VQ image
decode is recorded apart as ``image_decode_s``), timed between synchronised timers, warm-up excluded.
"""
from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

PROTOCOL = (
    "step_compression = mean over images of n_tokens/n_forwards (forwards include prefill and the forced "
    "head/tail); latency = batch 1, per image, token generation only, synchronised perf_counter, warm-up "
    "decode excluded; peak_mem_bytes = max over images of torch.cuda.max_memory_allocated (null on CPU)"
)


def step_compression(records: Sequence[Mapping[str, Any]]) -> float:
    """Mean over images of generated tokens per model forward."""
    if not records:
        raise ValueError("no records: decode some images first")
    return statistics.fmean(r["n_tokens"] / r["n_forwards"] for r in records)


def latency_stats(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean and median per-image latency in seconds."""
    lat = [float(r["latency_s"]) for r in records]
    return {"latency_mean_s": statistics.fmean(lat), "latency_median_s": statistics.median(lat)}


def peak_memory(records: Sequence[Mapping[str, Any]]) -> int | None:
    """Largest peak memory over the images (None when no record has one, e.g. CPU runs)."""
    mems = [int(r["peak_mem_bytes"]) for r in records if r.get("peak_mem_bytes") is not None]
    return max(mems) if mems else None


def speed_scores(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every speed metric of one run."""
    out = {
        "step_compression": step_compression(records),
        "n_forwards_mean": statistics.fmean(r["n_forwards"] for r in records),
        "n_tokens_mean": statistics.fmean(r["n_tokens"] for r in records),
        **latency_stats(records),
        "peak_mem_bytes": peak_memory(records),
    }
    if all(r.get("image_decode_s") is not None for r in records):  # the VQ decode, apart from latency_s
        out["image_decode_mean_s"] = statistics.fmean(r["image_decode_s"] for r in records)
    return out


def speed_metric(run: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``speed`` metric of :mod:`eval.run` (``run``: an ``eval.run.RunData``)."""
    return speed_scores(run.records)
