"""Recipe of the embedded ``tiny`` model: shapes tokenizer + plain next-token training on CPU.

``make tiny-model`` == ``python -m train.tiny_recipe`` (three phases, see the Makefile). Seeded; on 2 CPU
cores phase 1 takes about 45 minutes. Writes ``--out-dir`` (default ``models/weights/tiny/``: config.json,
model.safetensors, vq.safetensors, recipe.json with the measured numbers, loss.csv).

Steps:
1. the untrained model of ``conf/model/tiny_scratch.yaml`` (its loader fits the shapes patch VQ by
   k-means on rendered scenes), or ``--init-from`` a tiny checkpoint (its VQ is kept);
2. tokenise a fixed training set (caption -> word ids, image -> image sequence) through the adapter;
3. train through the common loop (:func:`train.loop.fit`) with ``conf/train/tiny_pretrain.yaml``, the flags
   below overriding its values: next-token prediction on the image sequence, prompt dropout for CFG;
4. measure AR sampling with CFG on the shapes evaluation prompts and record the per-category scores.

Only the adapter protocol and the model registry are used (``train/`` imports no concrete model module).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from core.config import compose_config
from models import REPO_ROOT, load_adapter
from train.config import TrainConfig, train_config_from_dict
from train.loop import fit


@dataclass(frozen=True)
class RecipeConfig:
    out_dir: str = "models/weights/tiny"
    seed: int = 0
    n_codes: int = 0  # 0: the shapes VQ default
    vq_fit_images: int = 3000
    train_examples: int = 60000
    steps: int = 1100
    batch_size: int = 24
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    prompt_dropout: float = 0.1
    bf16: bool = True
    threads: int = 0  # 0: torch default; 1 avoids OpenMP barrier stalls when the cores are shared
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    intermediate_size: int = 704
    eval_prompts: int = 120
    eval_cfg_scale: float = 3.0
    eval_top_k: int = 0
    init_from: str = ""  # a tiny checkpoint dir to continue from (its VQ is kept); "" = fresh start
    colour_share: float = 0.0  # share of training captions from the colour categories (colors, color_attr)


COLOUR_CATEGORIES = ("colors", "color_attr")


def make_examples(n: int, seed: int, colour_share: float = 0.0):
    """``n`` (caption, image uint8 [64, 64, 3]) training pairs from the shapes grammar.

    ``colour_share``: share of examples drawn from the categories whose captions name colours (the
    rest: every category alike). Colour is decided by one or two object-start codes per image, a
    faint signal in the mean loss; a colour-heavy phase teaches the binding (see recipe.json).
    """
    from data import shapes

    rng = np.random.default_rng(seed)
    caps, imgs = [], []
    for _ in range(n):
        category = str(rng.choice(COLOUR_CATEGORIES)) if rng.random() < colour_share else None
        caption, _category, scene = shapes.sample_example(rng, category)
        caps.append(caption)
        imgs.append(shapes.render(scene))
    return caps, np.stack(imgs)


def tokenize(adapter, captions: list[str], images: np.ndarray) -> list[tuple[list[int], int]]:
    """``(input_ids, prompt_len)`` training records: the caption's prompt ids + the image sequence."""
    out = []
    for caption, image in zip(captions, images):
        prompt = list(adapter.prompt_ids(caption))
        out.append((prompt + adapter.encode_image(image).tolist(), len(prompt)))
    return out


def train_config(cfg: RecipeConfig) -> TrainConfig:
    """``conf/train/tiny_pretrain.yaml`` with this phase's flags."""
    o = cfg
    overrides = [f"train.seed={o.seed + 1}", f"train.max_steps={o.steps}", f"train.micro_batch={o.batch_size}",
                 f"train.global_batch={o.batch_size}", f"train.bf16={o.bf16}", f"train.optim.lr={o.lr}",
                 f"train.optim.min_lr_ratio={o.min_lr_ratio}", f"train.optim.warmup_steps={o.warmup_steps}",
                 f"train.optim.weight_decay={o.weight_decay}", f"train.optim.grad_clip={o.grad_clip}",
                 f"train.layout.prompt_dropout={o.prompt_dropout}", "run_dir=unused"]
    conf = compose_config(["train=tiny_pretrain", *overrides], config_name="train")
    return train_config_from_dict(OmegaConf.to_container(conf.train, resolve=True))


def model_config(cfg: RecipeConfig) -> dict:
    """``conf/model/tiny_scratch.yaml`` with this phase's sizes, or the ``--init-from`` checkpoint."""
    if cfg.init_from:
        overrides = ["model=tiny", f"model.path={cfg.init_from}"]
    else:
        overrides = ["model=tiny_scratch", f"model.seed={cfg.seed}", f"model.n_codes={cfg.n_codes}",
                     f"model.vq_fit_images={cfg.vq_fit_images}", f"model.vq_fit_seed={cfg.seed + 7}",
                     *(f"model.architecture.{k}={getattr(cfg, k)}" for k in
                       ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"))]
    return OmegaConf.to_container(compose_config(overrides, config_name="train").model, resolve=True)


def train(adapter, records, cfg: RecipeConfig, out: Path, run_dir: Path | None = None) -> list[float]:
    """This phase through :func:`train.loop.fit`; the weights go to ``out``, the loss curve beside them."""
    run_dir = run_dir or REPO_ROOT / "runs" / "train" / f"tiny_recipe-seed{cfg.seed}-{int(time.time())}"
    res = fit(adapter, records, replace(train_config(cfg), export_dir=str(out)), run_dir, resume=False)
    shutil.copyfile(run_dir / "loss.csv", out / (f"loss_continued_seed{cfg.seed}.csv" if cfg.init_from else "loss.csv"))
    return res.losses


def evaluate(adapter, n_prompts: int, cfg_scale: float, top_k: int, seed: int) -> dict:
    """AR sampling with CFG on the first ``n_prompts`` shapes evaluation prompts (balanced) -> scores."""
    from data import shapes, shapes_check
    from decode.api import generate
    from decode.sampling import SamplingConfig

    prompts = balanced_subset(shapes.load_eval_prompts(), n_prompts)
    sampling = SamplingConfig(cfg_scale=cfg_scale, temperature=1.0, top_k=top_k, top_p=1.0)
    per_cat: dict[str, list[bool]] = {}
    for rec in tqdm(prompts, desc="eval tiny (AR+CFG)", dynamic_ncols=True):
        g = torch.Generator().manual_seed(seed * 100003 + rec["idx"])
        res = generate(adapter, rec["prompt"], {"name": "ar"}, sampling, g)
        ok = shapes_check.check(adapter.decode_image(res.tokens), rec["prompt"])["correct"]
        per_cat.setdefault(rec["category"], []).append(bool(ok))
    scores = {c: float(np.mean(v)) for c, v in per_cat.items()}
    scores["overall"] = float(np.mean(list(scores.values())))
    return scores


def balanced_subset(prompts: list[dict], n: int) -> list[dict]:
    """The first prompts of each category in turn until ``n`` are taken."""
    by_cat: dict[str, list[dict]] = {}
    for p in prompts:
        by_cat.setdefault(p["category"], []).append(p)
    out, i = [], 0
    while len(out) < min(n, len(prompts)):
        for cat in by_cat.values():
            if i < len(cat) and len(out) < n:
                out.append(cat[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f, v in asdict(RecipeConfig()).items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(v, bool) else type(v)
        ap.add_argument(f"--{f.replace('_', '-')}", type=kind, default=v)
    ap.add_argument("--eval-only", action="store_true", help="score the saved model, do not train")
    cfg = RecipeConfig(**{k: v for k, v in vars(ap.parse_args(argv)).items() if k != "eval_only"})
    args = ap.parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out = out if out.is_absolute() else REPO_ROOT / out
    out.mkdir(parents=True, exist_ok=True)

    if args.eval_only:
        adapter = load_adapter({**model_config(RecipeConfig(init_from=str(out))), "name": "tiny"})
        print(json.dumps(evaluate(adapter, cfg.eval_prompts, cfg.eval_cfg_scale, cfg.eval_top_k, cfg.seed), indent=1))
        return

    t0 = time.time()
    previous = None
    adapter = load_adapter(model_config(cfg))  # tiny_scratch: the shapes VQ is fitted here
    if cfg.init_from:
        init_dir = REPO_ROOT / cfg.init_from if not Path(cfg.init_from).is_absolute() else Path(cfg.init_from)
        if (init_dir / "recipe.json").is_file():
            previous = json.loads((init_dir / "recipe.json").read_text())
        print(f"[tiny] continuing from {init_dir} ({adapter.layout.n_codes} codes)")
    else:
        print(f"[tiny] shapes VQ: {adapter.layout.n_codes} codes, fitted in {time.time() - t0:.0f}s")
    t_vq = time.time() - t0
    n_params = sum(p.numel() for p in adapter.model.parameters())
    t1 = time.time()
    captions, images = make_examples(cfg.train_examples, cfg.seed, cfg.colour_share)
    records = tokenize(adapter, captions, images)
    print(f"[tiny] {n_params / 1e6:.2f}M parameters; {len(records)} training sequences of {len(records[0][0])} "
          f"tokens ({time.time() - t1:.0f}s)")

    t2 = time.time()
    losses = train(adapter, records, cfg, out)  # exports the weights and the VQ to out
    t_train = time.time() - t2
    adapter.model.eval()
    t3 = time.time()
    scores = evaluate(adapter, cfg.eval_prompts, cfg.eval_cfg_scale, cfg.eval_top_k, cfg.seed) if cfg.eval_prompts else {}
    recipe = {
        "recipe": asdict(cfg), "previous_phase": previous, "n_params": n_params, "n_codes": adapter.layout.n_codes,
        "train_time_s": round(t_train, 1),
        "vq_time_s": round(t_vq, 1), "eval_time_s": round(time.time() - t3, 1), "final_loss": float(np.mean(losses[-50:])),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "shapes_scores_ar_cfg": scores,
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1))
    print(json.dumps(recipe, indent=1))


if __name__ == "__main__":
    main()
