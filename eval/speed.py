"""Speed metrics from the per-image records (DESIGN.md section 8): pure math over ``samples.jsonl`` rows.

Step compression is the papers' *mean of ratios*: the mean over images of ``n_tokens / n_forwards``
(not total tokens over total forwards). Latency is per image, batch 1, generation only (the VQ image
decode is recorded apart as ``image_decode_s``), timed between synchronised timers, warm-up excluded.
A run with any image decoded in a batch (``batch_size > 1``, :mod:`decode.loop`) has no batch-1 latency:
its latency metrics are left out (so no latency speed-up is derived from it) and its speed is throughput,
images per second of the decode loop (VQ decode and saving included), summed over loop invocations.
A run dir holds one batch size (it is part of the run's identity, decode/identity.py); a dir resumed with
another one before that rule has neither latency nor throughput, and says so in ``speed_note``.
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
    """Mean and median per-image latency in seconds (batch-1 records only)."""
    if batch_size(records) > 1:
        raise ValueError(f"{sum(int(r.get('batch_size') or 1) > 1 for r in records)} of {len(records)} images were "
                         "decoded in batches: they have no batch-1 latency (compare throughput_img_s instead, or "
                         "decode with batch_size=1 for latency)")
    lat = [float(r["latency_s"]) for r in records]
    return {"latency_mean_s": statistics.fmean(lat), "latency_median_s": statistics.median(lat)}


def batch_size(records: Sequence[Mapping[str, Any]]) -> int:
    """The largest batch any image was decoded in (records before batching: 1)."""
    return max((int(r.get("batch_size") or 1) for r in records), default=1)


def throughput(records: Sequence[Mapping[str, Any]]) -> float | None:
    """Images per second: images over the summed wall time of the decode loops that made them (each loop:
    its last ``loop_s``); None when a record lacks the loop fields (runs decoded before they existed)."""
    spans: dict[str, float] = {}
    for r in records:
        if r.get("loop_id") is None or r.get("loop_s") is None:
            return None
        spans[r["loop_id"]] = max(spans.get(r["loop_id"], 0.0), float(r["loop_s"]))
    total = sum(spans.values())
    return len(records) / total if total > 0 else None


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
        "peak_mem_bytes": peak_memory(records),
        "batch_size": batch_size(records),
        "throughput_img_s": throughput(records),
    }
    sizes = sorted({int(r.get("batch_size") or 1) for r in records})
    if len(sizes) > 1:  # timings of several batch sizes: neither a latency nor one throughput
        out["throughput_img_s"] = None
        out["speed_note"] = (f"images decoded at batch sizes {sizes}: no latency or throughput is reported; decode "
                             "the run again into a new run dir at one batch_size")
    elif out["batch_size"] == 1:
        out.update(latency_stats(records))
    else:
        out["latency_note"] = f"batched (batch_size={out['batch_size']}): no batch-1 latency; see throughput_img_s"
    if all(r.get("image_decode_s") is not None for r in records):  # the VQ decode, apart from latency_s
        out["image_decode_mean_s"] = statistics.fmean(r["image_decode_s"] for r in records)
    return out


def speed_metric(run: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``speed`` metric of :mod:`eval.run` (``run``: an ``eval.run.RunData``)."""
    return speed_scores(run.records)
