"""``make bench``: AR vs SJD (vs SJD2) on the trained tiny models, same prompts and seeds, one process.

Per row: step compression (mean of per-image ratios), latency mean / median, latency speed-up over AR
on the same model, and the share of the decode time spent outside the model forward (sampling,
acceptance tests, cache bookkeeping: the loop overhead that speculative decoding adds). The forward
time is measured by :class:`ForwardTimer`, a proxy around the adapter (no patching). Images go
through :func:`decode.run.timed_generate`, the function the decode stage times with. Results are
printed as a table and saved to ``bench/results/decoders-<time>.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.demo import TABLE1_ROWS, load_models
from core.config import compose_config
from core.rundir import environment, image_seed, sync_device
from decode.run import timed_generate

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class ForwardTimer:
    """Adapter proxy that times ``forward`` between synchronised timers; everything else passes through."""

    def __init__(self, inner: Any):
        self._inner = inner
        self.forward_s = 0.0
        self.n_forwards = 0

    def reset(self) -> None:
        self.forward_s, self.n_forwards = 0.0, 0

    def forward(self, inputs_embeds: torch.Tensor, cache: Any, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        device = torch.device(self._inner.device)
        sync_device(device)
        t0 = time.perf_counter()
        kw = {} if position_ids is None else {"position_ids": position_ids}
        out = self._inner.forward(inputs_embeds, cache, attention_mask, **kw)
        sync_device(device)
        self.forward_s += time.perf_counter() - t0
        self.n_forwards += 1
        return out

    def __getattr__(self, name: str) -> Any:  # only called for attributes the proxy lacks
        return getattr(self._inner, name)


def bench_row(adapter: Any, model: str, decoder: str, prompts: Sequence[Any], seed: int,
              overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Decode ``prompts`` with one (model, decoder); per-image records + summary statistics."""
    from decode.api import generate
    from decode.sampling import SamplingConfig
    from eval.speed import speed_scores

    cfg = compose_config([f"model={model}", f"decoder={decoder}", f"seed={seed}", *overrides])
    decoder_cfg = dict(cfg.decoder)
    sampling = SamplingConfig(**cfg.sampling)
    timer = ForwardTimer(adapter)
    timed_generate(generate, timer, prompts[0].prompt, decoder_cfg, sampling, image_seed(seed, -1))  # warm-up
    records = []
    for p in prompts:
        timer.reset()
        t = timed_generate(generate, timer, p.prompt, decoder_cfg, sampling, image_seed(seed, p.idx))
        if timer.n_forwards != t.result.n_forwards:
            raise RuntimeError(f"{decoder} reports {t.result.n_forwards} forwards but called forward "
                               f"{timer.n_forwards} times; fix its n_forwards count")
        records.append({"idx": p.idx, "n_tokens": t.result.n_tokens, "n_forwards": t.result.n_forwards,
                        "latency_s": t.latency_s, "forward_s": timer.forward_s, "peak_mem_bytes": t.peak_mem_bytes})
    outside = [1.0 - r["forward_s"] / r["latency_s"] for r in records]
    metrics = {**speed_scores(records), "outside_forward_share": statistics.fmean(outside),
               "forward_ms_mean": 1000 * statistics.fmean(r["forward_s"] / r["n_forwards"] for r in records)}
    # The scores.json shape of eval.run, so eval.tables builds the table (and latency_speedup = AR latency / this latency).
    return {"run_dir": f"{model}/{decoder}", "model": model, "decoder": decoder, "decoder_options": decoder_cfg,
            "sampling": dict(cfg.sampling), "prompts": "shapes", "seed": seed, "n_images": len(records),
            "metrics": metrics, "records": records}


COLUMNS = ("model", "decoder", "step_compression", "n_forwards_mean", "latency_mean_s", "latency_median_s",
           "latency_speedup", "outside_forward_share", "forward_ms_mean")


def run_bench(n_prompts: int = 24, seed: int = 0, rows: Sequence[tuple[str, str]] = TABLE1_ROWS,
              overrides: Sequence[str] = (), adapters: dict[str, Any] | None = None,
              out_dir: Path = RESULTS_DIR) -> tuple[list[dict[str, Any]], Path]:
    """Bench every row whose model loads; print the table; save the JSON. Returns (rows, json path)."""
    from data.prompts import load_prompts
    from eval.tables import build_table, select_columns, to_markdown

    adapters = load_models(rows, overrides) if adapters is None else adapters
    prompts = load_prompts({"kind": "shapes", "name": "shapes", "limit": n_prompts})
    results = [bench_row(adapters[m], m, d, prompts, seed, overrides) for m, d in rows if m in adapters]
    header, table = select_columns(*build_table(results), COLUMNS)
    print(to_markdown(header, table))
    device = next(iter(adapters.values())).device if adapters else None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"decoders-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {"n_prompts": n_prompts, "seed": seed, "overrides": list(overrides), "env": environment(device),
               "protocol": "batch 1, warm-up decode per row excluded, synchronised perf_counter; "
                           "outside_forward_share = mean over images of 1 - forward time / decode time",
               "table": {"header": header, "rows": table}, "rows": results}
    path.write_text(json.dumps(payload, indent=1))
    print(f"[bench] wrote {path}")
    return results, path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-prompts", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every row, e.g. model.device=cuda")
    args = parser.parse_args(argv)
    run_bench(args.n_prompts, args.seed, overrides=args.overrides)


if __name__ == "__main__":
    main()
