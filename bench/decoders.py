"""``make bench``: AR vs SJD (vs SJD2) on the trained tiny models, same prompts and seeds, one process.

Two tables: batch-1 speed (below) and throughput, images/s of AR, SJD and SJD2 at batch sizes 1, 4, 16
with the speed-up over AR at the same batch size and over AR at batch 1.

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


def throughput_row(adapter: Any, model: str, decoder: str, prompts: Sequence[Any], seed: int, batch_size: int,
                   overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Images per second of token generation for ``prompts`` at ``batch_size`` (1: one image at a time, as
    the decode stage does; > 1: :func:`decode.api.generate_batch` with refill). Warm-up excluded."""
    from decode.api import generate, generate_batch
    from decode.sampling import SamplingConfig

    cfg = compose_config([f"model={model}", f"decoder={decoder}", f"seed={seed}", *overrides])
    decoder_cfg, sampling = dict(cfg.decoder), SamplingConfig(**cfg.sampling)
    device = torch.device(adapter.device)
    items = [(p.idx, p.prompt, image_seed(seed, p.idx)) for p in prompts]

    def decode(todo: Sequence[tuple[int, str, int]]) -> list[Any]:
        if batch_size == 1:
            return [generate(adapter, text, decoder_cfg, sampling, torch.Generator(device=device).manual_seed(s))
                    for _, text, s in todo]
        return [f.result for f in generate_batch(adapter, todo, decoder_cfg, sampling, batch_size)]

    decode([(-1, prompts[0].prompt, image_seed(seed, -1))] * min(batch_size, len(prompts)))  # warm-up
    sync_device(device)
    t0 = time.perf_counter()
    results = decode(items)
    sync_device(device)
    seconds = time.perf_counter() - t0
    return {"model": model, "decoder": decoder, "batch_size": batch_size, "n_images": len(results),
            "seconds": seconds, "images_per_s": len(results) / seconds,
            "step_compression": statistics.fmean(r.n_tokens / r.n_forwards for r in results)}


def throughput_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: images/s per (decoder, B), speed-up over AR at the same B and over AR at batch 1 (the AR
    row of the first model: tiny and tiny_sjd2 share one architecture)."""
    ar = {r["batch_size"]: r["images_per_s"] for r in rows if r["decoder"] == "ar"}
    lines = ["| model | decoder | batch | images/s | vs AR same batch | vs AR batch 1 | step compression |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        same = r["images_per_s"] / ar[r["batch_size"]] if r["batch_size"] in ar else float("nan")
        one = r["images_per_s"] / ar[1] if 1 in ar else float("nan")
        lines.append(f"| {r['model']} | {r['decoder']} | {r['batch_size']} | {r['images_per_s']:.3f} | {same:.2f}x | "
                     f"{one:.2f}x | {r['step_compression']:.2f} |")
    return "\n".join(lines)


THROUGHPUT_ROWS = (("tiny", "ar"), ("tiny", "sjd"), ("tiny_sjd2", "sjd2_tiny"))


def run_throughput(adapters: dict[str, Any], n_prompts: int = 32, seed: int = 0,
                   batch_sizes: Sequence[int] = (1, 4, 16), overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every (decoder, batch size) of :data:`THROUGHPUT_ROWS` whose model loaded, on the same prompts."""
    from data.prompts import load_prompts

    prompts = load_prompts({"kind": "shapes", "name": "shapes", "limit": n_prompts})
    out = []
    for model, decoder in THROUGHPUT_ROWS:
        if model not in adapters:
            continue
        for b in batch_sizes:
            out.append(throughput_row(adapters[model], model, decoder, prompts, seed, b, overrides))
            print(f"[bench] {model} {decoder} batch {b}: {out[-1]['images_per_s']:.3f} images/s", flush=True)
    return out


COLUMNS = ("model", "decoder", "step_compression", "n_forwards_mean", "latency_mean_s", "latency_median_s",
           "latency_speedup", "outside_forward_share", "forward_ms_mean")


def run_bench(n_prompts: int = 24, seed: int = 0, rows: Sequence[tuple[str, str]] = TABLE1_ROWS,
              overrides: Sequence[str] = (), adapters: dict[str, Any] | None = None,
              out_dir: Path = RESULTS_DIR, batch_sizes: Sequence[int] = (1, 4, 16),
              n_throughput: int = 32) -> tuple[list[dict[str, Any]], Path]:
    """Bench every row whose model loads; print the table; save the JSON. Returns (rows, json path)."""
    from data.prompts import load_prompts
    from eval.tables import build_table, select_columns, to_markdown

    adapters = load_models(rows, overrides) if adapters is None else adapters
    prompts = load_prompts({"kind": "shapes", "name": "shapes", "limit": n_prompts})
    results = [bench_row(adapters[m], m, d, prompts, seed, overrides) for m, d in rows if m in adapters]
    header, table = select_columns(*build_table(results), COLUMNS)
    print(to_markdown(header, table))
    throughput = run_throughput(adapters, n_throughput, seed, batch_sizes, overrides) if batch_sizes else []
    if throughput:
        print(f"\nThroughput ({n_throughput} prompts, token generation only):\n" + throughput_table(throughput))
    device = next(iter(adapters.values())).device if adapters else None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"decoders-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {"n_prompts": n_prompts, "seed": seed, "overrides": list(overrides), "env": environment(device),
               "protocol": "batch 1, warm-up decode per row excluded, synchronised perf_counter; "
                           "outside_forward_share = mean over images of 1 - forward time / decode time",
               "table": {"header": header, "rows": table}, "rows": results,
               "throughput": throughput, "throughput_table": throughput_table(throughput) if throughput else None}
    path.write_text(json.dumps(payload, indent=1))
    print(f"[bench] wrote {path}")
    return results, path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-prompts", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4, 16],
                        help="throughput table batch sizes (none: skip the table)")
    parser.add_argument("--n-throughput", type=int, default=32, help="prompts per throughput row")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every row, e.g. model.device=cuda")
    args = parser.parse_args(argv)
    run_bench(args.n_prompts, args.seed, overrides=args.overrides, batch_sizes=args.batch_sizes,
              n_throughput=args.n_throughput)


if __name__ == "__main__":
    main()
