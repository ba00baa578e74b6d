"""A tiny CLIP for the shapes world, so that ``clip_score`` on shapes runs means something.

It is a plain ``transformers.CLIPModel`` (tiny config, 64x64 images, patch 8) with a ``CLIPProcessor``
(a byte-level BPE ``CLIPTokenizer`` trained on shapes captions + a 64-px ``CLIPImageProcessor``), saved
with ``save_pretrained`` into ``models/weights/shapes_clip/``: eval loads it through the same
``from_pretrained`` path as a hub id. Trained contrastively on CPU in a few minutes from
``data.shapes`` renders and captions; identical captions in a batch count as positives of each other
(the world repeats captions such as "a circle" often). ``python -m models.shapes_clip`` re-trains it.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

WEIGHTS_DIR = Path(__file__).parent / "weights" / "shapes_clip"
RECIPE_FILE = "recipe.json"


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the committed weights (written to recipe.json beside them)."""

    seed: int = 0
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    n_train: int = 16384  # rendered once from data.shapes (seed), batches drawn from it
    n_eval: int = 200  # held-out examples (seed + 1) for the final metrics
    tokenizer_vocab: int = 400  # BPE merges learned on captions (every byte stays in the vocabulary)
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    patch: int = 8
    projection_dim: int = 64
    max_text_len: int = 77  # CLIP's context: longer texts are truncated


# ---------------------------------------------------------------------------------------------------
# Tokenizer, processor, model


def build_tokenizer(captions: list[str], vocab_size: int):
    """A ``CLIPTokenizer`` whose BPE merges are learned on ``captions`` (so shapes words are one token each).

    Every byte-level symbol (and its end-of-word form) is added to the vocabulary, so any text encodes
    (unknown words as bytes) and the unknown token, which is CLIP's end-of-text, never appears mid-text.
    Built from ``vocab=`` / ``merges=`` (transformers 5.x ignores ``vocab_file=`` / ``merges_file=``).
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    trained = CLIPTokenizer().train_new_from_iterator(captions, vocab_size=vocab_size)
    bpe = json.loads(trained.backend_tokenizer.to_str())["model"]
    vocab = dict(bpe["vocab"])
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        for token in (ch, ch + "</w>"):
            vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def build_processor(tokenizer, image_size: int = 64):
    """``CLIPProcessor`` = the tokenizer + CLIP's image processor at ``image_size`` (CLIP mean / std)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def build_model(recipe: Recipe, tokenizer, image_size: int = 64):
    """A randomly initialised tiny ``CLIPModel`` whose special-token ids match ``tokenizer``."""
    from transformers import CLIPConfig, CLIPModel

    sizes = {"hidden_size": recipe.hidden, "intermediate_size": 4 * recipe.hidden,
             "num_hidden_layers": recipe.layers, "num_attention_heads": recipe.heads}
    text = dict(sizes, vocab_size=len(tokenizer), max_position_embeddings=recipe.max_text_len,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(sizes, image_size=image_size, patch_size=recipe.patch)
    assert tokenizer.eos_token_id != 2, "eos id 2 selects transformers' legacy argmax pooling"
    torch.manual_seed(recipe.seed)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=recipe.projection_dim))


def pixel_values(images: np.ndarray, processor) -> torch.Tensor:
    """uint8 [B, 64, 64, 3] -> the processor's normalised [B, 3, 64, 64] (no resize: already 64 px)."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def embed(model, processor, images: np.ndarray, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm (image, text) embeddings [B, D] of uint8 images and texts."""
    tok = processor.tokenizer(texts, padding=True, truncation=True, max_length=model.config.text_config.max_position_embeddings,
                              return_tensors="pt")
    img = model.get_image_features(pixel_values=pixel_values(images, processor)).pooler_output
    txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
    return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)


@torch.no_grad()
def clip_scores(model, processor, images: np.ndarray, texts: list[str], batch_size: int = 128) -> np.ndarray:
    """100 x cos(image_i, text_i) per pair, unclamped."""
    out = []
    for s in range(0, len(texts), batch_size):
        img, txt = embed(model, processor, images[s:s + batch_size], texts[s:s + batch_size])
        out.append(100.0 * (img * txt).sum(-1))
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------------------------------
# Training


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                     captions: list[str]) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with every pair of identical captions a positive (soft targets)."""
    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.T  # [B, B]
    index: dict[str, int] = {}
    ids = torch.tensor([index.setdefault(c, len(index)) for c in captions])
    same = (ids[:, None] == ids[None, :]).float()
    target = same / same.sum(-1, keepdim=True)
    return 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                  + torch.nn.functional.cross_entropy(logits.T, target))


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * t))


def control_images(kind: str, n: int, seed: int) -> np.ndarray:
    """uint8 [n, 64, 64, 3] images that match no caption: ``noise`` (uniform pixels) or ``blocks``
    (8-px cells of random colours)."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)
    if kind == "blocks":
        cells = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
        return cells.repeat(8, axis=1).repeat(8, axis=2)
    raise ValueError(f"unknown control images {kind!r}; expected 'noise' or 'blocks'")


def separation(model, processor, n: int, seed: int) -> dict[str, float]:
    """Mean CLIP score of held-out renders with their captions, with shuffled captions, and of noise /
    random-block images with the captions; plus image->text top-1 accuracy over distinct captions."""
    from data.shapes import dataset_arrays

    captions, _, images = dataset_arrays(n, seed)
    shuffled = [captions[i] for i in np.random.default_rng(seed).permutation(n)]
    out = {
        "clip_gt": float(clip_scores(model, processor, images, captions).mean()),
        "clip_shuffled": float(clip_scores(model, processor, images, shuffled).mean()),
        "clip_noise": float(clip_scores(model, processor, control_images("noise", n, seed), captions).mean()),
        "clip_blocks": float(clip_scores(model, processor, control_images("blocks", n, seed), captions).mean()),
    }
    distinct = sorted(set(captions))
    with torch.no_grad():
        img, _ = embed(model, processor, images, captions[:1])
        _, txt = embed(model, processor, images[:1], distinct)
    best = (img @ txt.T).argmax(-1).tolist()
    out["top1_image_to_text"] = float(np.mean([distinct[b] == c for b, c in zip(best, captions)]))
    out["n_distinct_captions"] = len(distinct)
    return out


def train(recipe: Recipe, log_every: int = 100):
    """Train from scratch -> (model, processor, final metrics)."""
    from data.shapes import dataset_arrays

    torch.manual_seed(recipe.seed)
    captions, _, images = dataset_arrays(recipe.n_train, recipe.seed)
    processor = build_processor(build_tokenizer(captions, recipe.tokenizer_vocab))
    model = build_model(recipe, processor.tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    rng = np.random.default_rng(recipe.seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        pick = rng.choice(recipe.n_train, size=recipe.batch_size, replace=False)
        batch_captions = [captions[i] for i in pick]
        img, txt = embed(model, processor, images[pick], batch_captions)
        loss = contrastive_loss(img, txt, model.logit_scale, batch_captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == recipe.steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    metrics = {"final_loss": float(loss.item()), "train_s": round(time.perf_counter() - t0, 1),
               **separation(model, processor, recipe.n_eval, recipe.seed + 1)}
    return model, processor, metrics


def save(model, processor, recipe: Recipe, metrics: dict[str, Any], path: str | Path = WEIGHTS_DIR) -> Path:
    """``save_pretrained`` of model and processor + recipe.json (settings and final metrics)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / RECIPE_FILE).write_text(json.dumps({"recipe": asdict(recipe), "metrics": metrics,
                                                "command": "python -m models.shapes_clip"}, indent=1) + "\n")
    return path


def load_shapes_clip(path: str | Path | None = None):
    """(CLIPModel in eval mode, CLIPProcessor) from ``path`` (default: the committed weights)."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(path) if path is not None else WEIGHTS_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no shapes CLIP at {path} (config.json missing); train it with "
                                f"`python -m models.shapes_clip --out {path}`")
    return CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--out", default=str(WEIGHTS_DIR))
    args = parser.parse_args(argv)
    recipe = Recipe(steps=args.steps, seed=args.seed)
    model, processor, metrics = train(recipe)
    print(json.dumps(metrics, indent=1))
    print(f"wrote {save(model, processor, recipe, metrics, args.out)}")


if __name__ == "__main__":
    main()
