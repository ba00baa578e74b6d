"""Recipe of the embedded ``tiny`` model: shapes tokenizer + plain next-token training on CPU.

``make tiny-model`` == ``python -m train.tiny_recipe``. Seeded; on 2 CPU cores it takes about 45 minutes
(most of it the model; the tokenizer takes seconds). Writes ``models/weights/tiny/`` (config.json,
model.safetensors, vq.safetensors, recipe.json with the measured numbers) and ``loss.csv``.

Steps:
1. fit the patch VQ (k-means) on rendered shapes scenes;
2. tokenise a fixed training set (caption -> word ids, image -> image sequence);
3. train a small Llama for next-token prediction on the image sequence (prompt dropout for CFG);
4. measure AR sampling with CFG on the shapes evaluation prompts and record the per-category scores.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models import REPO_ROOT
from models.tiny import BOS, PAD, TinyConfig, build, save
from train.engines import warmup_cosine

IGNORE = -100


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


def tokenize(adapter, captions: list[str], images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded [N, T] ids and the per-row prompt length (incl. padding) of the training set."""
    vq = adapter.vq
    grids = torch.cat([vq.encode_batch(images[i : i + 2048]) for i in range(0, len(images), 2048)])
    prompts = [adapter.prompt_ids(c) for c in captions]
    p_max = max(len(p) for p in prompts)
    n_img = adapter.layout.n_tokens
    ids = torch.full((len(prompts), p_max + n_img), PAD, dtype=torch.long)
    for i, (p, g) in enumerate(zip(prompts, grids)):
        ids[i, p_max - len(p) : p_max] = torch.tensor(p)
        ids[i, p_max:] = adapter.layout.sequence(g + adapter.layout.code_start)
    return ids, torch.full((len(prompts),), p_max, dtype=torch.long)


def batch_tensors(ids: torch.Tensor, p_max: int, drop: torch.Tensor):
    """(input_ids, attention_mask, labels) with the prompt of rows in ``drop`` replaced by ``<bos>``."""
    ids = ids.clone()
    ids[drop, :p_max] = PAD
    ids[drop, p_max - 1] = BOS
    mask = (ids != PAD).long()
    labels = ids.clone()
    labels[:, :p_max] = IGNORE  # loss on the image sequence only
    return ids, mask, labels


def lr_at(step: int, cfg: RecipeConfig) -> float:
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio, peak=cfg.lr)


def train(adapter, ids: torch.Tensor, p_max: int, cfg: RecipeConfig, out: Path) -> list[float]:
    model = adapter.model.train()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    losses = []
    with open(out / (f"loss_continued_seed{cfg.seed}.csv" if cfg.init_from else "loss.csv"), "w") as f:
        f.write("step,loss,lr\n")
        for step in (bar := tqdm(range(cfg.steps), desc="train tiny", dynamic_ncols=True)):
            rows = torch.randint(0, len(ids), (cfg.batch_size,), generator=gen)
            drop = torch.rand(cfg.batch_size, generator=gen) < cfg.prompt_dropout
            x, mask, labels = batch_tensors(ids[rows], p_max, drop)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            f.write(f"{step},{losses[-1]:.5f},{lr_at(step, cfg):.3e}\n")
            f.flush()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


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

    from data import shapes
    from models.shapes_vq import fit
    from models.tiny import load

    if args.eval_only:
        adapter = load(out)
        print(json.dumps(evaluate(adapter, cfg.eval_prompts, cfg.eval_cfg_scale, cfg.eval_top_k, cfg.seed), indent=1))
        return

    t0 = time.time()
    previous = None
    if cfg.init_from:
        init_dir = REPO_ROOT / cfg.init_from if not Path(cfg.init_from).is_absolute() else Path(cfg.init_from)
        adapter = load(init_dir)
        adapter.model.float()
        vq = adapter.vq
        if (init_dir / "recipe.json").is_file():
            previous = json.loads((init_dir / "recipe.json").read_text())
        print(f"[tiny] continuing from {init_dir} ({vq.n_codes} codes)")
    else:
        _, vq_imgs = make_examples(cfg.vq_fit_images, cfg.seed + 7)
        vq = fit(vq_imgs, **({"n_codes": cfg.n_codes} if cfg.n_codes else {}), seed=cfg.seed)
        print(f"[tiny] shapes VQ: {vq.n_codes} codes, fitted in {time.time() - t0:.0f}s")
        config = TinyConfig(
            words=tuple(shapes.VOCAB), n_codes=vq.n_codes, hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
        )
        adapter = build(config, seed=cfg.seed, vq=vq)
    vq.save(out / "vq.safetensors")
    t_vq = time.time() - t0
    n_params = sum(p.numel() for p in adapter.model.parameters())
    t1 = time.time()
    captions, images = make_examples(cfg.train_examples, cfg.seed, cfg.colour_share)
    ids, p_len = tokenize(adapter, captions, images)
    print(f"[tiny] {n_params / 1e6:.2f}M parameters; {len(ids)} training sequences of {ids.shape[1]} tokens "
          f"({time.time() - t1:.0f}s)")

    t2 = time.time()
    losses = train(adapter, ids, int(p_len[0]), cfg, out)
    t_train = time.time() - t2
    save(adapter, out)
    t3 = time.time()
    scores = evaluate(adapter, cfg.eval_prompts, cfg.eval_cfg_scale, cfg.eval_top_k, cfg.seed) if cfg.eval_prompts else {}
    recipe = {
        "recipe": asdict(cfg), "previous_phase": previous, "n_params": n_params, "n_codes": vq.n_codes,
        "train_time_s": round(t_train, 1),
        "vq_time_s": round(t_vq, 1), "eval_time_s": round(time.time() - t3, 1), "final_loss": float(np.mean(losses[-50:])),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "shapes_scores_ar_cfg": scores,
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1))
    print(json.dumps(recipe, indent=1))


if __name__ == "__main__":
    main()
