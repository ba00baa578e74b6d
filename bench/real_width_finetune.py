"""SJD2 fine-tuning at real width through the user's commands: ``python -m bench.real_width_finetune``.

1. a Lumina-mGPT-7B-768 checkpoint laid out as published, random, at the real hidden size, heads, vocabulary
   (65,536) and image layout (768 px, 2,357 image tokens) but 2 layers (and, by default, a quarter of the MLP
   width: two ZeRO-3 processes of the full 2-layer width peak above 2 x 11 GB, beyond a 24 GB machine) plus
   Meta's VQGAN at real size (:mod:`bench.real_size`);
2. ``python -m train.data`` over a folder of shapes images (768 px, ``<stem>.txt`` captions) through that VQGAN;
3. ``make finetune MODEL=lumina_mgpt NPROC=2`` (DeepSpeed ZeRO-3, gloo, bf16) on that overfit set, stopped
   after half the steps as if killed, then the same command again: it resumes from the checkpoint;
4. checks: the loss falls; the resumed run continued the step count; the export carries ``sjd2.json``
   (noise recipe + embedding statistics taken under partitioned parameters) and loads; ``python -m decode``
   with ``decoder=sjd2_lumina_mgpt`` decodes an image from the export.

Results: ``bench/results/real_width_finetune-<date>.json``. Needs ~22 GB of memory; run it alone.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.real_size import RESULTS, machine, scratch_dir
from models import REPO_ROOT


def sh(cmd: list[str], env: dict | None = None) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}, check=True)
    return time.perf_counter() - t0


def images(folder: Path, n: int) -> None:
    from data import shapes

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        caption, _, scene = shapes.example(7, i)
        shapes.to_pil(shapes.render(scene, 768)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.real_width_finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--scratch", default=None, help="folder for checkpoint, data and run (outside the repo)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=2752, help="MLP width (real: 11008)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args(argv)
    root = scratch_dir(args.scratch) / "finetune"
    py = sys.executable
    ckpt, vq, run_dir = root / "lumina_mgpt_7b_768", root / "chameleon_tokenizer", root / "run"
    timings = {"write_s": sh([py, "-m", "bench.real_size", "write", "--models", "lumina", "--scratch", str(root),
                              "--layers", str(args.layers), "--intermediate", str(args.intermediate)])}
    images(root / "images", args.images)
    timings["shards_s"] = sh([py, "-m", "train.data", "model=lumina_mgpt_768", f"model.path={ckpt}",
                              f"model.vq_path={vq}", "model.device=cpu", f"source={root / 'images'}",
                              f"out_dir={root / 'shards'}"])
    ds_json = root / "zero3_cpu_bf16.json"  # the CPU config with the recipe's bf16 (conf's is fp32)
    ds = json.loads((REPO_ROOT / "conf" / "deepspeed" / "zero3_cpu.json").read_text())
    ds["bf16"]["enabled"] = "auto"
    ds_json.write_text(json.dumps(ds, indent=1))
    overrides = [f"model.path={ckpt}", "model.vq_path=null", "model.device=cpu", f"train.data.path={root / 'shards'}",
                 "train.global_batch=2", "train.micro_batch=1", f"train.max_steps={args.steps}",
                 "train.optim.lr=3e-4", "train.optim.warmup_steps=0", "train.optim.schedule=constant",
                 f"train.ckpt_every={args.steps // 2}", "train.objective.loss_chunk_tokens=1024",
                 f"train.deepspeed_config={ds_json}", f"run_dir={run_dir}", "progress=false"]
    make = ["make", "finetune", "MODEL=lumina_mgpt", "NPROC=2"]
    timings["part1_s"] = sh([*make, "ARGS=" + " ".join([*overrides, f"train.stop_after_steps={args.steps // 2}"])])
    rows1 = list(csv.DictReader((run_dir / "loss.csv").open()))
    timings["part2_s"] = sh([*make, "ARGS=" + " ".join(overrides)])
    rows = list(csv.DictReader((run_dir / "loss.csv").open()))
    steps = [int(r["step"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    export = run_dir / "export"
    recipe = json.loads((export / "sjd2.json").read_text())
    out_dir = root / "decode_sjd2"
    timings["decode_s"] = sh([py, "-m", "decode", "model=lumina_mgpt_768", f"model.path={export}", f"model.vq_path={vq}",
                              "model.device=cpu", "model.image_size=128", "decoder=sjd2_lumina_mgpt", "prompts=shapes",
                              "prompts.limit=1", "warmup=false", f"out_dir={out_dir}"])
    record = json.loads(next(out_dir.glob("samples*.jsonl")).read_text().splitlines()[0])
    result = {"machine": machine(), "layers": args.layers, "intermediate": args.intermediate, "timings": timings,
              "steps_before_kill": [int(r["step"]) for r in rows1], "steps": steps, "losses": losses,
              "loss_falls": losses[-1] < losses[0], "resumed": steps == list(range(steps[0], steps[0] + len(steps))),
              "recipe_keys": sorted(recipe), "decode_record": {k: record.get(k) for k in ("n_tokens", "n_forwards")}}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"real_width_finetune-{time.strftime('%Y%m%d')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    if not (result["loss_falls"] and result["resumed"]):
        raise SystemExit("error: the loss did not fall or the resumed run skipped / repeated steps (see above)")


if __name__ == "__main__":
    main()
