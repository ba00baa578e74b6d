"""The real-size check (``make real-size``): random-weight checkpoints laid out as the published ones, at
7B / 8B, loaded, measured and decoded through the user's own commands, on CPU in bfloat16.

    python -m bench.real_size write   [--models lumina,emu3] [--scratch DIR]      # 14 + 17 GB of files
    python -m bench.real_size measure --model lumina [--scratch DIR]   # load time, peak RSS, forwards, KV, VQ
    python -m bench.real_size decode  --model lumina [--decoders ar,sjd,sjd2]     # `python -m decode ...`

Needs 14-17 GB of free memory (one copy of the weights): run it alone on a 24 GB machine. Files go to
``--scratch`` (default ``$SJD2_SCRATCH`` or /tmp/sjd2-real-size), never into the repository. Results:
``bench/results/real_size-<model>-<date>.{json,md}``. The published layouts and where their names come from:
:mod:`bench.published`. The decode runs use a reduced ``model.image_size`` (Lumina 128 px = 8 x 8 codes,
77 steps; Emu3 64 px, 75 steps) so one image takes minutes on two cores; every other setting is the preset's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.measure import MemorySampler, forward_times, full_size_codes, timed
from bench.published import EMU3_8B, LUMINA_7B, LmSizes
from models import REPO_ROOT

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a photo of a red cat sitting on a blue chair left of a green plant"


@dataclass(frozen=True)
class Target:
    """One real model: its conf/model name, scratch folder names, decode presets, reduced image size."""

    key: str
    conf: str
    folder: str
    vq_folder: str | None
    decoders: dict[str, str]
    image_size: int
    full_side: int  # codes per side of a full-size image
    train_conf: str


TARGETS = {
    "lumina": Target("lumina", "lumina_mgpt_768", "lumina_mgpt_7b_768", "chameleon_tokenizer",
                     {"ar": "ar", "sjd": "sjd_lumina_mgpt", "sjd2": "sjd2_lumina_mgpt"}, 128, 48, "sjd2_lumina_mgpt"),
    "emu3": Target("emu3", "emu3_720", "emu3_gen", None,
                   {"ar": "ar", "sjd": "sjd_emu3", "sjd2": "sjd2_emu3"}, 64, 90, "sjd2_emu3"),
}


def scratch_dir(arg: str | None) -> Path:
    root = Path(arg or os.environ.get("SJD2_SCRATCH") or "/tmp/sjd2-real-size").expanduser().resolve()
    if root == REPO_ROOT or REPO_ROOT in root.parents:
        raise SystemExit(f"error: --scratch {root} is inside the repository; real-size files (14-17 GB) go elsewhere")
    return root


def write(targets: list[Target], scratch: Path, layers: int | None = None, intermediate: int | None = None) -> None:
    from dataclasses import replace

    from bench.published_emu3 import write_emu3
    from bench.published_lumina import write_lumina, write_vqgan

    for t in targets:
        sizes: LmSizes = LUMINA_7B if t.key == "lumina" else EMU3_8B
        if layers:
            sizes = replace(sizes, num_hidden_layers=layers)
        if intermediate:
            sizes = replace(sizes, intermediate_size=intermediate)
        t0 = time.perf_counter()
        if t.key == "lumina":
            write_lumina(scratch / t.folder, sizes)
            write_vqgan(scratch / t.vq_folder)
        else:
            write_emu3(scratch / t.folder, sizes)
        print(f"wrote {scratch / t.folder} ({folder_gib(scratch / t.folder):.2f} GiB) in {time.perf_counter() - t0:.0f} s")


def folder_gib(folder: Path, pattern: str = "*.safetensors") -> float:
    return sum(p.stat().st_size for p in folder.glob(pattern)) / 2**30


def model_overrides(t: Target, scratch: Path, image_size: int) -> list[str]:
    out = [f"model={t.conf}", f"model.path={scratch / t.folder}", "model.device=cpu", "model.dtype=bfloat16",
           f"model.image_size={image_size}"]
    if t.vq_folder:
        out.append(f"model.vq_path={scratch / t.vq_folder}")
    return out


def write_recipe(adapter: Any, t: Target, ckpt: Path) -> None:
    """``sjd2.json`` beside the random weights: the preset's noise recipe with the statistics of these
    embeddings, so the SJD2 decoder runs on the real-size model (random weights: untrained, of course)."""
    if (ckpt / "sjd2.json").is_file():
        return
    (ckpt / "sjd2.json").write_text(json.dumps(random_recipe(adapter, t, "bench.real_size"), indent=1))


def random_recipe(adapter: Any, t: Target, who: str) -> dict:
    """The preset's noise recipe with the statistics of ``adapter``'s (random) embeddings, as ``sjd2.json``."""
    from omegaconf import OmegaConf

    from models.noisy import EmbeddingNorm, NoiseConfig, Sjd2Recipe

    noise = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf" / "train" / f"{t.train_conf}.yaml").noise)
    return Sjd2Recipe(noise=NoiseConfig(**noise), norm=EmbeddingNorm.from_adapter(adapter),
                      training={"name": f"{who}: random weights, no training"}).to_json()


def measure(t: Target, scratch: Path, image_size: int, lengths: tuple[int, ...], vq: bool = True) -> dict:
    from core.config import compose_config
    from models import load_adapter

    cfg = compose_config(model_overrides(t, scratch, image_size))
    weights_gib = folder_gib(scratch / t.folder)
    codec_gib = folder_gib(scratch / t.vq_folder, "*.ckpt") if t.vq_folder else 0.0
    mem = MemorySampler()
    with mem.running():
        t0 = time.perf_counter()
        adapter = load_adapter(cfg.model)
        load_s = time.perf_counter() - t0
    load_mem = mem.report()
    goal_gib = 1.2 * weights_gib + codec_gib
    out: dict[str, Any] = {"model": t.conf, "checkpoint": str(scratch / t.folder), "weights_gib": weights_gib,
                           "codec_file_gib": codec_gib, "load_s": load_s, "load_memory": load_mem,
                           "rss_goal_gib": goal_gib, "rss_goal_met": load_mem["peak_anon_gib"] <= goal_gib,
                           "threads": torch.get_num_threads(), "dtype": str(adapter.dtype)}
    print(json.dumps(out, indent=1), flush=True)
    with mem.running():
        out["forwards"] = forward_times(adapter, PROMPT, lengths)
        print(json.dumps(out["forwards"], indent=1), flush=True)
        out["vq_decode_full_s"] = vq_decode_full(adapter, t) if vq else None
        write_recipe(adapter, t, scratch / t.folder)
    out["peak_memory"] = mem.report()
    return out


def vq_decode_full(adapter: Any, t: Target) -> float:
    """Seconds to decode a full-size (768 / 720 px) image of random codes through the model's codec."""
    codes = full_size_codes(adapter.code_map.n_codes, t.full_side)
    if t.key == "lumina":
        dt, pixels = timed(lambda: adapter.vq.decode(codes), adapter.device, reps=1)
    else:
        from models.emu3 import emu3_layout

        layout = emu3_layout(adapter.tokenizer.get_vocab(), t.full_side * adapter.pixels_per_code,
                             adapter.pixels_per_code, adapter.code_map.id_range())
        seq = layout.sequence(adapter.code_map.to_ids(codes[0]))[None]
        dt, pixels = timed(lambda: adapter.model.model.decode_image_tokens(
            image_tokens=seq, height=t.full_side, width=t.full_side), adapter.device, reps=1)
    print(f"VQ decode of a full-size image: {tuple(pixels.shape)} in {dt:.1f} s", flush=True)
    return dt


def decode(t: Target, scratch: Path, image_size: int, decoders: list[str]) -> dict:
    """The user's command, one process per decoder: wall time, the child's peak RSS, its record."""
    rows = {}
    for name in decoders:
        out_dir = scratch / "runs" / f"{t.key}_{name}_{image_size}px"
        cmd = [sys.executable, "-m", "decode", *model_overrides(t, scratch, image_size), f"decoder={t.decoders[name]}",
               "prompts=shapes", "prompts.limit=1", "warmup=false", "seed=0", f"out_dir={out_dir}"]
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        records = [json.loads(line) for f in sorted(out_dir.glob("samples*.jsonl")) for line in f.read_text().splitlines()]
        rec = records[0] if records else {}
        rows[name] = {"command": " ".join(cmd[1:]), "exit": code, "wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2**20,
                      "n_tokens": rec.get("n_tokens"), "n_forwards": rec.get("n_forwards"),
                      "latency_s": rec.get("latency_s"), "image": str(out_dir / "images" / "000000.png")}
        print(json.dumps(rows[name], indent=1), flush=True)
    return rows


def save(t: Target, kind: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"real_size-{t.key}-{kind}-{time.strftime('%Y%m%d')}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def machine() -> dict:
    import platform

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.real_size", description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=("write", "measure", "decode"))
    p.add_argument("--models", "--model", default="lumina,emu3", help="lumina, emu3 or both (comma-separated)")
    p.add_argument("--scratch", default=None, help="folder for the checkpoints and runs (outside the repo)")
    p.add_argument("--layers", type=int, default=None, help="write: fewer decoder layers (real width)")
    p.add_argument("--intermediate", type=int, default=None,
                   help="write: a smaller MLP width (the 2-process fine-tune of bench/real_width_finetune.sh)")
    p.add_argument("--image-size", type=int, default=None, help="model.image_size (default: the reduced size)")
    p.add_argument("--lengths", default="1,16,96,128", help="measure: window lengths timed (inputs per stream)")
    p.add_argument("--decoders", default="ar,sjd,sjd2", help="decode: which of ar, sjd, sjd2")
    p.add_argument("--no-vq", action="store_true", help="measure: skip the full-size VQ decode (Emu3's: ~16 min)")
    args = p.parse_args(argv)
    scratch = scratch_dir(args.scratch)
    try:
        targets = [TARGETS[k] for k in args.models.split(",")]
    except KeyError as err:
        raise SystemExit(f"error: unknown model {err} (use lumina, emu3)") from None
    if args.step == "write":
        write(targets, scratch, args.layers, args.intermediate)
        return
    for t in targets:
        size = args.image_size or t.image_size
        if args.step == "measure":
            save(t, "measure", measure(t, scratch, size, tuple(int(x) for x in args.lengths.split(",")),
                                              vq=not args.no_vq))
        else:
            save(t, "decode", {"image_size": size, "runs": decode(t, scratch, size, args.decoders.split(","))})


if __name__ == "__main__":
    main()
