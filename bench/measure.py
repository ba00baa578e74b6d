"""What the real-size check measures on a loaded adapter: host memory while loading, forward time per
window length with CFG, KV-cache bytes per token, and the image codec's decode time at full size."""
from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

GIB = 1024**3


def _status_kib(keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0])
    return out


@dataclass
class MemorySampler:
    """Peak resident memory of this process, sampled every ``period_s`` from /proc (``VmRSS``: all resident
    pages, file-backed ones of mmap'd weight files included; ``RssAnon``: private memory, i.e. the
    copies this process holds) plus the kernel's own ``ru_maxrss``."""

    period_s: float = 0.02
    peak_rss_kib: int = 0
    peak_anon_kib: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        now = _status_kib(("VmRSS", "RssAnon"))
        self.peak_rss_kib = max(self.peak_rss_kib, now.get("VmRSS", 0))
        self.peak_anon_kib = max(self.peak_anon_kib, now.get("RssAnon", 0))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    @contextmanager
    def running(self):
        self._stop.clear()
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.sample()

    def report(self) -> dict[str, float]:
        return {"peak_rss_gib": self.peak_rss_kib / 2**20, "peak_anon_gib": self.peak_anon_kib / 2**20,
                "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def timed(fn: Callable[[], Any], device: torch.device, reps: int = 2) -> tuple[float, Any]:
    """(best wall time over ``reps`` calls, the last result); CUDA synchronised around each call."""
    best, out = float("inf"), None
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def cache_bytes(cache: Any) -> int:
    """Bytes of every key and value tensor of a transformers 5.x cache."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def forward_times(adapter: Any, text: str, lengths: tuple[int, ...], reps: int = 2,
                  batch: int = 1) -> dict[str, Any]:
    """Prefill ``text`` with CFG (``batch`` prompts: 2 * batch streams), then time one forward of ``L``
    image-code inputs for each ``L`` in ``lengths`` (rolled back after each call, so every window sits on
    the same prompt). Also the KV-cache bytes per token (per stream and per CFG row) after the prefill."""
    pf = adapter.prompt(text, cfg=True)
    ids, mask = pf.input_ids.repeat(batch, 1), pf.attention_mask.repeat(batch, 1)
    streams = ids.shape[0]
    prefill_s, (_, cache) = timed(lambda: adapter.forward(adapter.embed(ids), None, mask), adapter.device, reps=1)
    n_cached = ids.shape[1]
    per_token = cache_bytes(cache) / (streams * n_cached)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"prompt_tokens": n_cached, "streams": streams, "prefill_s": prefill_s,
                           "kv_bytes_per_token_per_stream": per_token, "kv_bytes_per_token_cfg_row": 2 * per_token,
                           "forward_s": {}}
    for n in lengths:
        codes = torch.randint(adapter.layout.code_start, adapter.layout.code_stop, (1, n), generator=gen)
        embeds = adapter.embed(codes.expand(streams, n).to(ids.device))
        grown = torch.cat([mask, torch.ones(streams, n, dtype=mask.dtype, device=mask.device)], dim=1)

        def step(embeds=embeds, grown=grown, n=n):
            logits, c = adapter.forward(embeds, cache, grown)
            adapter.rollback(c, n)
            return logits

        out["forward_s"][str(n)], logits = timed(step, adapter.device, reps=reps)
        if not torch.isfinite(logits).all():
            raise RuntimeError(f"non-finite logits from a {n}-input forward")
    return out


def full_size_codes(n_codes: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, n_codes, (1, side, side), generator=torch.Generator().manual_seed(seed))


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


__all__ = ["GIB", "MemorySampler", "cache_bytes", "cuda_peak_gib", "forward_times", "full_size_codes",
           "reset_cuda_peak", "timed"]
