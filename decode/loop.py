"""The decode stage's image loop: decode, save and record each image of a shard, at batch 1 (one timed
decode per image) or ``batch_size > 1`` (:func:`decode.api.generate_batch`, rows refilled as they finish).

Every record says how it was made: ``batch_size``; ``latency_s`` (batch 1 only: generation time of that
image alone; ``null`` in a batched run, where an image shares every forward with other rows and its wall
time, ``in_batch_s``, is not a latency); and for throughput ``loop_id`` (one invocation of one shard) with
``loop_s``, seconds from the loop's start (warm-up excluded) until this image was saved, VQ decode and
saving included. ``eval.speed`` turns those into images per second.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.rundir import (
    append_record,
    atomic_write_bytes,
    environment,
    image_name,
    image_seed,
    save_image,
    sync_device,
)
from data.prompts import Prompt

GenerateFn = Callable[..., Any]  # decode.api.generate(adapter, text, decoder_cfg, sampling, generator)


def _json_safe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


@dataclass(frozen=True)
class Timed:
    """A decode result with its cost: ``latency_s`` covers token generation only (not the VQ decode); a
    batched row has no latency (None) but its wall time in the batch, ``in_batch_s``."""

    result: Any
    latency_s: float | None
    peak_mem_bytes: int | None
    batch_size: int = 1
    in_batch_s: float | None = None


def timed_generate(generate_fn: GenerateFn, adapter: Any, text: str, decoder_cfg: Mapping[str, Any],
                   sampling: Any, seed: int) -> Timed:
    """One batch-1 decode between synchronised timers, with its own seeded generator."""
    device = torch.device(adapter.device)
    generator = torch.Generator(device=device).manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync_device(device)
    start = time.perf_counter()
    result = generate_fn(adapter, text, decoder_cfg, sampling, generator)
    sync_device(device)
    latency_s = time.perf_counter() - start
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return Timed(result, latency_s, peak)


def make_record(prompt: Prompt, sample: int, seed: int, image: str, timed: Timed, image_decode_s: float,
                conf: Mapping[str, Any], shard: int, loop: tuple[str, float] | None = None) -> dict[str, Any]:
    """The JSON line of one image (every field eval needs to recompute its metrics)."""
    res = timed.result
    coco = {f"coco_{k}": prompt.meta[k] for k in ("image_id", "file_name") if k in (prompt.meta or {})}
    return {
        "idx": prompt.idx,
        "sample": sample,
        "prompt": prompt.prompt,
        "category": prompt.category,
        "seed": seed,
        "model": conf["model"].get("name"),
        "decoder": conf["decoder"].get("name"),
        "image": image,
        "n_tokens": int(res.n_tokens),
        "n_forwards": int(res.n_forwards),
        "latency_s": timed.latency_s,
        "image_decode_s": image_decode_s,
        "peak_mem_bytes": timed.peak_mem_bytes,
        "batch_size": timed.batch_size,
        "in_batch_s": timed.in_batch_s,
        **({"loop_id": loop[0], "loop_s": loop[1]} if loop is not None else {}),
        "accepted_per_forward": [int(a) for a in res.accepted_per_forward],
        "tokens": torch.as_tensor(res.tokens).reshape(-1).tolist(),
        "shard": shard,
        "extra": _json_safe(getattr(res, "extra", {}) or {}),
        **coco,  # COCO prompt sets: the val image this caption belongs to (FID's reference matching)
    }


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def decode_images(conf: Mapping[str, Any], todo: list[tuple[Prompt, int]], run_dir: Path, records_path: Path,
                  shard: tuple[int, int], per_prompt: int, sampling: Any, adapter: Any,
                  generate_fn: GenerateFn) -> int:
    """Warm up, then decode, save and record ``todo``: one image at a time, or ``conf.batch_size`` at once."""
    from tqdm import tqdm

    decoder_cfg, seed = conf["decoder"], int(conf["seed"])
    batch_size = int(conf.get("batch_size") or 1)
    env_name = "env.json" if shard[1] == 1 else f"env-{shard[0]}.json"
    atomic_write_bytes(run_dir / env_name, json.dumps(environment(adapter.device), indent=1).encode())
    bar = tqdm(total=len(todo), desc=f"{conf['decoder'].get('name')} shard {shard[0]}/{shard[1]}"
               + (f" batch {batch_size}" if batch_size > 1 else ""), disable=not conf["progress"], unit="img")
    loop_id = f"{shard[0]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def save(prompt: Prompt, j: int, s: int, timed: Timed, start: float) -> None:
        t0 = time.perf_counter()
        image = adapter.decode_image(timed.result.tokens)
        image_decode_s = time.perf_counter() - t0
        name = image_name(prompt.idx, j, per_prompt)
        save_image(image, run_dir / name)
        loop = (loop_id, time.perf_counter() - start)
        append_record(records_path, make_record(prompt, j, s, name, timed, image_decode_s, conf, shard[0], loop))
        bar.update(1)

    if batch_size == 1:
        if conf["warmup"]:  # compile kernels, fill allocators: not part of any timing
            timed_generate(generate_fn, adapter, todo[0][0].prompt, decoder_cfg, sampling, image_seed(seed, -1))
        start = time.perf_counter()
        for prompt, j in todo:
            s = image_seed(seed, prompt.idx, j)
            save(prompt, j, s, timed_generate(generate_fn, adapter, prompt.prompt, decoder_cfg, sampling, s), start)
        bar.close()
        return len(todo)

    from decode.api import generate_batch

    device = torch.device(adapter.device)
    if conf["warmup"]:  # a full batch of the first prompt, untimed
        warm = [(None, todo[0][0].prompt, image_seed(seed, -1, i)) for i in range(min(batch_size, len(todo)))]
        for _ in generate_batch(adapter, warm, decoder_cfg, sampling, batch_size):
            pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync_device(device)
    start = time.perf_counter()
    items = (((p, j, image_seed(seed, p.idx, j)), p.prompt, image_seed(seed, p.idx, j)) for p, j in todo)
    for done in generate_batch(adapter, items, decoder_cfg, sampling, batch_size):
        prompt, j, s = done.key
        save(prompt, j, s, Timed(done.result, None, _peak(device), batch_size, done.in_batch_s), start)
    bar.close()
    return len(todo)
