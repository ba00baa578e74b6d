"""The GPU check: real-size random-weight Lumina-mGPT-7B and Emu3-Gen built on the device (no files, no
network), then per-forward times at 1 / 16 / 96 / 128 inputs at B = 1, 4, 16 in bf16 with CFG, AR vs SJD vs
SJD2 on one prompt (forwards, steps/s and the step-time ratio to AR) and the peak memory; a markdown report
in ``bench/results/gpu-<device>-<date>.md``.

    python -m bench.gpu_check                                   # one 80 GB GPU: both models, < 8 min
    python -m bench.gpu_check --device cpu --layers 1 --batches 1,4 --lengths 1,16   # the CPU proof

The decoders run at a reduced image size (``--image-size``, default 384 px for Lumina-mGPT = 605 steps of
AR, 192 px for Emu3 = 603), so the step counts are bounded and equal for both models; each decoder's
setting is its preset's (``sjd_*`` / ``sjd2_*``), SJD2 with a noise recipe made from the random embeddings.
Random weights: the step *counts* of SJD/SJD2 say nothing about trained models; the times per step do.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from bench.measure import MemorySampler, cuda_peak_gib, forward_times, reset_cuda_peak, timed
from bench.published import EMU3_8B, LUMINA_7B, LmSizes
from bench.real_size import PROMPT, TARGETS, random_recipe

RESULTS = Path(__file__).resolve().parent / "results"
SMALL_SIZE = {"lumina": 384, "emu3": 192}


@contextlib.contextmanager
def built_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Modules made inside are created on ``device`` in ``dtype`` (no float32 copy on the host first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build(key: str, device: str, layers: int | None, image_size: int) -> Any:
    """The family's adapter around a real-size random model, with an SJD2 recipe from its embeddings."""
    from core.config import compose_config
    from models import load_adapter

    t = TARGETS[key]
    s: LmSizes = LUMINA_7B if key == "lumina" else EMU3_8B
    cfg = OmegaConf.to_container(compose_config([f"model={t.conf}"]).model, resolve=True)
    cfg.update(random_init=True, device=device, dtype="bfloat16", image_size=image_size, random_sizes={
        "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
        "num_hidden_layers": layers or s.num_hidden_layers, "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_key_value_heads, "max_position_embeddings": s.max_position_embeddings})
    with built_on(device, torch.bfloat16):
        adapter = load_adapter(cfg)
    adapter.sjd2_recipe = random_recipe(adapter, t, "bench.gpu_check")
    return adapter


def decode_steps(adapter: Any, key: str) -> dict[str, dict]:
    """AR, SJD and SJD2 (their presets) on one prompt: forwards, seconds, steps/s, step time vs AR."""
    from core.config import compose_config
    from decode.api import generate
    from decode.sampling import SamplingConfig

    rows = {}
    for name, preset in TARGETS[key].decoders.items():
        conf = OmegaConf.to_container(compose_config([f"model={TARGETS[key].conf}", f"decoder={preset}"],
                                                     config_name="decode"), resolve=True)
        sampling = SamplingConfig(**conf["sampling"])
        gen = torch.Generator(device=adapter.device).manual_seed(0)
        run = lambda d=conf["decoder"], s=sampling, g=gen: generate(adapter, PROMPT, d, s, g)
        wall, out = timed(run, adapter.device, reps=1)
        rows[name] = {"preset": preset, "forwards": int(out.n_forwards), "tokens": int(out.tokens.numel()),
                      "seconds": wall, "steps_per_s": out.n_forwards / wall, "step_s": wall / out.n_forwards}
        print(json.dumps({name: rows[name]}), flush=True)
    for row in rows.values():
        row["step_time_vs_ar"] = row["step_s"] / rows["ar"]["step_s"]
        row["latency_vs_ar"] = rows["ar"]["seconds"] / row["seconds"]
    return rows


def check_model(key: str, device: str, layers: int | None, image_size: int, batches: tuple[int, ...],
                lengths: tuple[int, ...]) -> dict:
    dev = torch.device(device)
    mem = MemorySampler()
    reset_cuda_peak(dev)
    with mem.running():
        t0 = time.perf_counter()
        adapter = build(key, device, layers, image_size)
        build_s = time.perf_counter() - t0
        n_params = sum(p.numel() for p in adapter.model.parameters())
        out: dict[str, Any] = {"model": TARGETS[key].conf, "layers": layers or "all", "params_b": n_params / 1e9,
                               "build_s": build_s, "image_size": image_size, "forwards": {}}
        print(json.dumps(out), flush=True)
        for b in batches:
            out["forwards"][str(b)] = forward_times(adapter, PROMPT, lengths, batch=b)
            print(json.dumps({f"B={b}": out["forwards"][str(b)]["forward_s"]}), flush=True)
        out["decoders"] = decode_steps(adapter, key)
    out["peak_gpu_gib"] = cuda_peak_gib(dev)
    out["peak_host"] = mem.report()
    del adapter
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def markdown(results: list[dict], device_name: str, wall: float) -> str:
    lines = [(f"# GPU check on {device_name} ({time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
             f"{wall:.0f} s)"), "", ("Random weights at real width, bf16, CFG (2 streams per row). "
             "`python -m bench.gpu_check` — see its docstring."), ""]
    for r in results:
        lines += [(f"## {r['model']} ({r['params_b']:.2f} B parameters, layers: {r['layers']}, built in "
                  f"{r['build_s']:.1f} s)"), "", "Per-forward seconds (inputs per stream x rows B):", ""]
        lengths = list(next(iter(r["forwards"].values()))["forward_s"])
        lines += ["| B | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
        for b, f in r["forwards"].items():
            lines.append(f"| {b} | " + " | ".join(f"{f['forward_s'][n] * 1e3:.1f} ms" for n in lengths) + " |")
        kv = next(iter(r["forwards"].values()))["kv_bytes_per_token_per_stream"]
        lines += ["", f"KV cache: {kv / 1024:.0f} KiB per token per stream.", "",
                  f"Decoders at {r['image_size']} px (one prompt, preset settings):", "",
                  "| decoder | preset | forwards | seconds | steps/s | step time / AR | latency speed-up |",
                  "|---|---|---|---|---|---|---|"]
        for name, d in r["decoders"].items():
            lines.append(f"| {name} | {d['preset']} | {d['forwards']} | {d['seconds']:.1f} | {d['steps_per_s']:.1f} | "
                         f"{d['step_time_vs_ar']:.2f} | {d['latency_vs_ar']:.2f}x |")
        peak = r["peak_gpu_gib"]
        gpu = f"GPU {peak:.1f} GiB, " if peak is not None else ""
        lines += ["", f"Peak memory: {gpu}host RSS {r['peak_host']['peak_rss_gib']:.1f} GiB.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="lumina,emu3")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (the CPU proof)")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--lengths", default="1,16,96,128")
    p.add_argument("--image-size", type=int, default=None, help="decoder runs (default: 384 Lumina, 192 Emu3)")
    p.add_argument("--out", default=None, help="report path (default bench/results/gpu-<device>-<date>.md)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; run on a GPU machine or pass --device cpu --layers 1 (the proof)")
    t0 = time.perf_counter()
    results = []
    for key in args.models.split(","):
        if key not in TARGETS:
            raise SystemExit(f"error: unknown model {key!r} (use lumina, emu3)")
        results.append(check_model(key, args.device, args.layers, args.image_size or SMALL_SIZE[key],
                                   tuple(int(x) for x in args.batches.split(",")),
                                   tuple(int(x) for x in args.lengths.split(","))))
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    slug = name.lower().replace(" ", "-") + (f"-{args.layers}layer" if args.layers else "")
    out = Path(args.out) if args.out else RESULTS / f"gpu-{slug}-{time.strftime('%Y%m%d')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results, name, time.perf_counter() - t0))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
