"""SJD2 fine-tuning levers on ``tiny``: a fast teacher-forced proxy of AR quality and SJD2 ability (issue 11).

Decoding hundreds of AR images per candidate is too slow on CPU, so candidates are screened on ``N``
held-out shapes examples (``data.shapes.example(--seed, i)``, a seed no training run uses), all
teacher-forced, each prompt-length group as one unpadded batch:

* ``clean_ce``: next-token cross-entropy on the image-code targets, clean inputs (plain AR ability);
* ``kl_cond``: mean KL(tiny || candidate) of the conditional next-token distributions at those targets;
* ``kl_uncond``: the same for the unconditional (``<bos>`` prompt) distributions, CFG's other row;
* ``kl_cfg``: the same for the CFG-guided distributions (scale ``--cfg-scale``, what AR decoding samples);
* ``noisy_ce``: the training loss on fully noised layouts (``conf/train/sjd2_tiny.yaml`` layout with
  clean_share 0 and no prompt dropout, fixed noise seed): CE over every code target of a noisy sequence;
* ``noisy_ce_slots``: CE only at positions whose input is noisy (the SJD2 draft slots).

Training time is the sum of ``step_time_s`` in the run's ``loss.csv``; the AR shapes score is read from an
``eval`` run dir's ``scores.json`` when given.

Usage::

    python -m bench.sjd2_levers --cand tiny=models/weights/tiny --cand lr3e-5=runs/levers/lr3e-5/export \\
        [--ar tiny=runs/levers/ar_tiny] [--diff lr3e-5="optim.lr=3e-5"] [--out bench/results/sjd2_levers]
    python -m bench.sjd2_levers make-data --out runs/levers/data_c05 --n 4096 --seed 2 --colour-share 0.5
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from core.config import compose_config
from models import REPO_ROOT, load_adapter
from models.noisy import EmbeddingNorm
from train.config import train_config_from_dict
from train.noising import IGNORE, make_batch, unconditional_ids
from train.objective import NoisyLM

COLUMNS = ("candidate", "recipe_diff", "train_s", "clean_ce", "kl_cond", "kl_uncond", "kl_cfg", "noisy_ce", "noisy_ce_slots",
           "ar_shapes", "ar_n")


def sjd2_train_config(name: str = "sjd2_tiny"):
    conf = compose_config([f"train={name}", "run_dir=unused"], config_name="train")
    from omegaconf import OmegaConf

    return train_config_from_dict(OmegaConf.to_container(conf.train, resolve=True))


def load_tiny(path: str):
    from omegaconf import OmegaConf

    conf = compose_config(["model=tiny", f"model.path={path}"], config_name="train")
    adapter = load_adapter(OmegaConf.to_container(conf.model, resolve=True))
    adapter.model.eval()
    return adapter


def heldout_records(adapter, n: int, seed: int) -> dict[int, list]:
    """Held-out records grouped by prompt length (no padding inside a group)."""
    from train.run import shapes_records

    groups: dict[int, list] = {}
    for rec in shapes_records(adapter, n, seed):
        groups.setdefault(int(rec[1]), []).append(rec)
    return groups


@torch.no_grad()
def logits_of(module: NoisyLM, batch) -> torch.Tensor:
    emb = module.inputs_embeds(batch.input_ids, batch.levels, batch.noise_seeds)
    out = module.lm.get_submodule(module._backbone)(inputs_embeds=emb, attention_mask=batch.attention_mask,
                                                     use_cache=False)
    return module.lm.get_submodule(module._lm_head)(out.last_hidden_state).float()  # [B, T, V]


def batches(adapter, groups: dict[int, list], cfg, seed: int, batch_rows: int = 64):
    """(clean, unconditional, noisy) batches of every group chunk; same rows, same targets."""
    uncond, layout = unconditional_ids(adapter), adapter.layout
    lay = cfg.layout
    clean_l = replace(lay, clean_share=1.0, prompt_dropout=0.0, loss_on="codes")
    uncond_l = replace(clean_l, prompt_dropout=1.0)
    noisy_l = replace(lay, clean_share=0.0, prompt_dropout=0.0, loss_on="codes")
    k = 0
    for _, recs in sorted(groups.items()):
        for lo in range(0, len(recs), batch_rows):
            chunk = recs[lo : lo + batch_rows]
            keys = [(0, k + i) for i in range(len(chunk))]
            k += len(chunk)
            args = (chunk, keys, layout, uncond, 0)
            yield (make_batch(*args, clean_l, cfg.noise.levels, seed), make_batch(*args, uncond_l, cfg.noise.levels, seed),
                   make_batch(*args, noisy_l, cfg.noise.levels, seed))


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of [N, V] logits."""
    lp, lq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def measure(paths: dict[str, str], n: int, seed: int, cfg_scale: float, noise_seed: int = 12345) -> dict[str, dict]:
    """The proxy metrics of every candidate (the first path is the reference, normally models/weights/tiny)."""
    cfg = sjd2_train_config()
    names = list(paths)
    adapters = {name: load_tiny(paths[name]) for name in names}
    ref = adapters[names[0]]
    norm = EmbeddingNorm.from_adapter(load_tiny("models/weights/tiny"))  # the norm every fine-tune of tiny uses
    modules = {name: NoisyLM(a, cfg.noise, norm, cfg.objective).eval() for name, a in adapters.items()}
    groups = heldout_records(ref, n, seed)
    sums = {name: dict.fromkeys(("clean_ce", "kl_cond", "kl_uncond", "kl_cfg", "noisy_ce", "noisy_ce_slots"), 0.0) for name in names}
    counts = {"codes": 0, "noisy": 0, "slots": 0}
    for clean, unc, noisy in batches(ref, groups, cfg, noise_seed):
        keep = clean.labels != IGNORE
        # unconditional rows: same image tokens, prompt <bos>; align the image columns from the right
        u_keep = unc.labels != IGNORE
        n_keep = noisy.labels != IGNORE
        slots = n_keep & (noisy.levels > 0)
        counts["codes"] += int(keep.sum())
        counts["noisy"] += int(n_keep.sum())
        counts["slots"] += int(slots.sum())
        ref_c = ref_u = ref_g = None
        for name in names:
            m = modules[name]
            c, u, z = logits_of(m, clean)[keep], logits_of(m, unc)[u_keep], logits_of(m, noisy)
            g = cfg_logits(c, u, cfg_scale)
            if ref_c is None:
                ref_c, ref_u, ref_g = c, u, g
            s = sums[name]
            s["clean_ce"] += float(F.cross_entropy(c, clean.labels[keep], reduction="sum"))
            s["kl_cond"] += float(kl_rows(ref_c, c).sum())
            s["kl_uncond"] += float(kl_rows(ref_u, u).sum())
            s["kl_cfg"] += float(kl_rows(ref_g, g).sum())
            s["noisy_ce"] += float(F.cross_entropy(z[n_keep], noisy.labels[n_keep], reduction="sum"))
            s["noisy_ce_slots"] += float(F.cross_entropy(z[slots], noisy.labels[slots], reduction="sum"))
    div = {"clean_ce": "codes", "kl_cond": "codes", "kl_uncond": "codes", "kl_cfg": "codes", "noisy_ce": "noisy", "noisy_ce_slots": "slots"}
    return {name: {k: v / max(counts[div[k]], 1) for k, v in s.items()} for name, s in sums.items()}


def train_seconds(path: str) -> float | None:
    """Sum of step_time_s in the loss.csv of the run that exported ``path`` (<run>/export) or beside it."""
    p = REPO_ROOT / path
    for f in (p.parent / "loss.csv", p / "loss.csv"):
        if f.is_file():
            with f.open() as fh:
                return sum(float(r["step_time_s"]) for r in csv.DictReader(fh) if r.get("step_time_s"))
    return None


def ar_score(run_dir: str | None) -> tuple[float | None, int | None]:
    if not run_dir:
        return None, None
    f = REPO_ROOT / run_dir / "scores.json"
    if not f.is_file():
        return None, None
    s = json.loads(f.read_text())
    flat = s.get("metrics", s)
    val = flat.get("shapes_overall")
    return (float(val) if val is not None else None), s.get("n_images")


def write_table(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def make_data(out: str, n: int, seed: int, colour_share: float) -> None:
    """A shards folder of tiny_recipe-style examples (its sequential rng, its colour share) for source=shards."""
    from train.data import MANIFEST, _write_shard
    from train.tiny_recipe import make_examples, tokenize

    adapter = load_tiny("models/weights/tiny")
    captions, images = make_examples(n, seed, colour_share)
    rows = tokenize(adapter, captions, images)
    d = REPO_ROOT / out
    d.mkdir(parents=True, exist_ok=True)
    _write_shard(rows, d / "shard_00000")
    (d / MANIFEST).write_text(json.dumps({"model": "tiny", "n_items": n, "seed": seed, "colour_share": colour_share,
                                          "columns": ["input_ids", "prompt_len"]}, indent=1))


def pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
        out[k] = v
    return out


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "make-data":
        ap = argparse.ArgumentParser()
        ap.add_argument("--out", required=True)
        ap.add_argument("--n", type=int, default=4096)
        ap.add_argument("--seed", type=int, default=2)
        ap.add_argument("--colour-share", type=float, default=0.5)
        a = ap.parse_args(argv[1:])
        make_data(a.out, a.n, a.seed, a.colour_share)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cand", action="append", required=True, help="NAME=weights dir; the first is the reference")
    ap.add_argument("--ar", action="append", help="NAME=eval run dir (scores.json)")
    ap.add_argument("--diff", action="append", help="NAME=recipe diff text")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--out", default="bench/results/sjd2_levers")
    a = ap.parse_args(argv)
    paths, ars, diffs = pairs(a.cand), pairs(a.ar), pairs(a.diff)
    metrics = measure(paths, a.n, a.seed, a.cfg_scale)
    rows = []
    for name, path in paths.items():
        score, n_img = ar_score(ars.get(name))
        rows.append({"candidate": name, "recipe_diff": diffs.get(name, ""), "train_s": train_seconds(path),
                     **metrics[name], "ar_shapes": score, "ar_n": n_img})
        print(json.dumps(rows[-1]))
    write_table(rows, REPO_ROOT / a.out)


if __name__ == "__main__":
    main()
