"""Tiny's pretraining before and after it moved into the common loop: the first steps' loss side by side.

``python -m bench.tiny_pretrain_curve [--steps 100] [--train-examples 6000] [--part before|after|both|table]``
writes ``bench/results/tiny_pretrain_curve.csv`` (and one file per curve) and prints the table.

* before: the loop ``train/tiny_recipe.py`` had until it moved into :func:`train.loop.fit` (kept here,
  verbatim in what it computes, as the reference): rows drawn with replacement by one torch generator,
  prompt dropout from the same generator, every prompt left-padded to the longest of the data set,
  HF's own loss, the lr set by hand each step;
* after: :func:`train.loop.fit` with ``conf/train/tiny_pretrain.yaml`` as ``train.tiny_recipe`` sets it
  up (per-epoch permutation of the records, per-example prompt dropout, per-batch padding, AdamW under
  LambdaLR, the same warm-up + cosine over the recipe's 1100 steps).

Both start from the same weights (``conf/model/tiny_scratch.yaml``, seed 0, the same fitted VQ) and train
on the same examples; only the order of the examples and the dropout draws differ, so the curves agree
step for step only in distribution (see the mean gaps over windows that the script prints).
"""
from __future__ import annotations

import argparse
import csv
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from models import REPO_ROOT, load_adapter
from models.tiny import BOS, PAD
from train.engines import warmup_cosine
from train.loop import fit
from train.tiny_recipe import RecipeConfig, make_examples, model_config, tokenize, train_config

IGNORE = -100
OUT = REPO_ROOT / "bench" / "results" / "tiny_pretrain_curve.csv"


def legacy_curve(adapter, records, cfg: RecipeConfig, n_steps: int) -> list[float]:
    """The recipe's own loop as it was (train/tiny_recipe.py before it moved into train.loop.fit)."""
    p_max = max(p for _, p in records)
    n_img = len(records[0][0]) - records[0][1]
    ids = torch.full((len(records), p_max + n_img), PAD, dtype=torch.long)
    for i, (row, p) in enumerate(records):
        ids[i, p_max - p :] = torch.tensor(row)
    model = adapter.model.train()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    losses = []
    for step in range(n_steps):
        rows = torch.randint(0, len(ids), (cfg.batch_size,), generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.prompt_dropout
        x = ids[rows].clone()
        x[drop, :p_max] = PAD
        x[drop, p_max - 1] = BOS
        mask = (x != PAD).long()
        labels = x.clone()
        labels[:, :p_max] = IGNORE
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"before step {step + 1}: {losses[-1]:.4f}", flush=True)
    return losses


def fit_curve(adapter, records, cfg: RecipeConfig, n_steps: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = replace(train_config(cfg), stop_after_steps=n_steps)
        return fit(adapter, records, tcfg, Path(tmp) / "run", resume=False, progress=True).losses


def part_file(part: str) -> Path:
    return OUT.with_name(f"{OUT.stem}_{part}.csv")


def run_part(part: str, steps: int, train_examples: int) -> None:
    """One curve (``before`` or ``after``) into its own file, so the two can run as parallel processes."""
    cfg = RecipeConfig(train_examples=train_examples)  # the recipe's phase-1 settings (1100-step schedule)
    start = load_adapter(model_config(cfg))
    captions, images = make_examples(cfg.train_examples, cfg.seed, cfg.colour_share)
    records = tokenize(start, captions, images)
    losses = (legacy_curve if part == "before" else fit_curve)(start, records, cfg, steps)
    part_file(part).write_text("".join(f"{x:.5f}\n" for x in losses))


def table(steps: int) -> None:
    before, after = ([float(x) for x in part_file(p).read_text().split()][:steps] for p in ("before", "after"))
    with open(OUT, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "before_recipe_loop", "after_train_loop_fit"])
        w.writerows([i + 1, f"{b:.5f}", f"{a:.5f}"] for i, (b, a) in enumerate(zip(before, after)))
    n = min(len(before), len(after))
    print(f"{'step':>5} {'before':>8} {'after':>8}")
    for i in range(0, n, 5):
        print(f"{i + 1:>5} {before[i]:8.4f} {after[i]:8.4f}")
    for lo in range(0, n, 20):
        b, a = np.mean(before[lo : lo + 20]), np.mean(after[lo : lo + 20])
        print(f"steps {lo + 1:>3}-{lo + 20:<3} mean before {b:.4f} after {a:.4f} gap {a - b:+.4f} ({(a - b) / b:+.1%})")
    print(f"wrote {OUT}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--train-examples", type=int, default=6000)
    ap.add_argument("--part", choices=("before", "after", "both", "table"), default="both",
                    help="one curve (run the two in parallel), both in turn, or only the table of the saved curves")
    args = ap.parse_args(argv)
    for part in {"both": ("before", "after"), "table": ()}.get(args.part, (args.part,)):
        run_part(part, args.steps, args.train_examples)
    if all(part_file(p).is_file() for p in ("before", "after")):
        table(args.steps)


if __name__ == "__main__":
    main()
