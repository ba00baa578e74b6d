"""CLIP score (eval/clip_score.py) end to end on hand-built run dirs with the committed shapes CLIP, and the
shapes CLIP itself (models/shapes_clip.py): it ranks true captions above mismatched ones and noise."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.shapes import dataset_arrays, to_pil
from eval.clip_score import clip_score_metric, load_clip, resolve_options
from eval.images import per_image_path
from eval.run import load_run
from models.shapes_clip import (
    WEIGHTS_DIR,
    Recipe,
    clip_scores,
    control_images,
    load_shapes_clip,
    save,
    separation,
    train,
)


@pytest.fixture(scope="module")
def shapes_clip():
    return load_shapes_clip()


def write_run(run_dir, images, prompts, corrupt=()):
    """A decode run dir as eval reads it: config.yaml, samples.jsonl, images/<idx>.png."""
    (run_dir / "images").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("prompts:\n  kind: shapes\n  name: shapes\nmodel:\n  name: hand\n")
    records = []
    for i, (im, prompt) in enumerate(zip(images, prompts)):
        path = run_dir / "images" / f"{i:05d}.png"
        if i in corrupt:
            path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        else:
            to_pil(im).save(path)
        records.append({"idx": i, "sample": 0, "prompt": prompt, "image": f"images/{i:05d}.png"})
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def direct_scores(model, processor, images, prompts):
    """100 x cos from the model's own embeddings, through the processor, without torchmetrics."""
    batch = processor(text=list(prompts), images=[to_pil(im) for im in images], return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        txt = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    return (100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1)).numpy()


def per_image(run_dir):
    return [json.loads(line) for line in per_image_path(run_dir, "clip_score").read_text().splitlines()]


def test_per_image_values_match_the_model_and_torchmetrics(tmp_path, shapes_clip):
    captions, _, images = dataset_arrays(12, seed=7)
    run = load_run(write_run(tmp_path / "run", images, captions))
    out = clip_score_metric(run, {"model": "shapes", "batch_size": 5})  # 3 batches, the last one short
    want = direct_scores(*shapes_clip, images, captions)
    rows = per_image(run.run_dir)
    assert [(r["idx"], r["sample"]) for r in rows] == [(i, 0) for i in range(12)]
    np.testing.assert_allclose([r["clip_score"] for r in rows], want, atol=1e-3)
    assert out["clip_score"] == pytest.approx(float(want.mean()), abs=1e-3)
    assert out["clip_score_torchmetrics"] == pytest.approx(max(float(want.mean()), 0.0), abs=1e-3)
    assert (out["clip_score_n"], out["clip_score_n_unreadable"], out["clip_score_model"]) == (12, 0, "shapes")


def test_negative_mean_is_kept_where_torchmetrics_clamps_it(tmp_path, shapes_clip):
    captions, _, _ = dataset_arrays(64, seed=11)
    noise = control_images("noise", 64, seed=11)
    scores = clip_scores(*shapes_clip, noise, captions)
    worst = np.argsort(scores)[:8]  # the 8 most negative (noise, caption) pairs: a run whose mean cosine is < 0
    assert scores[worst].mean() < -1.0, "the shapes CLIP no longer finds pairs with a negative score"
    run = load_run(write_run(tmp_path / "run", noise[worst], [captions[i] for i in worst]))
    out = clip_score_metric(run, {"model": str(WEIGHTS_DIR)})
    assert out["clip_score"] == pytest.approx(float(scores[worst].mean()), abs=1e-3)
    assert out["clip_score"] < 0 and out["clip_score_torchmetrics"] == 0.0


def test_long_prompts_are_truncated_to_the_context(tmp_path, shapes_clip):
    captions, _, images = dataset_arrays(3, seed=5)
    long = [c + " and" + " a red circle" * 40 for c in captions]  # ~125 tokens
    run = load_run(write_run(tmp_path / "run", images, long))
    out = clip_score_metric(run, {"model": "shapes"})
    model, processor = shapes_clip
    cut = processor.tokenizer(long, truncation=True, max_length=77)["input_ids"]
    kept = [processor.tokenizer.decode(ids, skip_special_tokens=True) for ids in cut]
    assert all(len(ids) == 77 for ids in cut)
    assert out["clip_score"] == pytest.approx(float(direct_scores(model, processor, images, kept).mean()), abs=1e-2)


def test_a_corrupt_png_is_named_and_the_others_scored(tmp_path, shapes_clip, capsys):
    captions, _, images = dataset_arrays(6, seed=3)
    run = load_run(write_run(tmp_path / "run", images, captions, corrupt={2}))
    out = clip_score_metric(run, {"model": "shapes"})
    assert (out["clip_score_n"], out["clip_score_n_unreadable"]) == (5, 1)
    assert "00002.png" in out["clip_score_unreadable"][0] and "00002.png" in capsys.readouterr().err
    keep = [0, 1, 3, 4, 5]
    assert [r["idx"] for r in per_image(run.run_dir)] == keep
    want = direct_scores(*shapes_clip, images[keep], [captions[i] for i in keep])
    np.testing.assert_allclose([r["clip_score"] for r in per_image(run.run_dir)], want, atol=1e-3)


def test_missing_weights_and_bad_options_say_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_clip(str(tmp_path / "no_such_clip"))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "no_such_clip") in msg and "hf download" in msg
    with pytest.raises(ValueError, match="known:"):
        resolve_options({"modle": "shapes"})
    with pytest.raises(ValueError, match="100"):
        resolve_options({"scale": 1.0})


def test_shapes_clip_ranks_true_captions_above_mismatched_ones_and_noise(shapes_clip):
    s = separation(*shapes_clip, n=200, seed=123)  # 200 held-out renders, not the training stream (seed 0)
    assert s["clip_gt"] > s["clip_shuffled"] + 10
    assert s["clip_shuffled"] > max(s["clip_noise"], s["clip_blocks"]) - 5
    assert s["clip_gt"] > max(s["clip_noise"], s["clip_blocks"]) + 15
    assert s["top1_image_to_text"] > 0.3


def test_shapes_tokenizer_and_processor_work_like_a_hub_checkpoint(shapes_clip):
    _, processor = shapes_clip
    tok = processor.tokenizer
    ids = tok("a red circle left of two blue squares")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 2 + 8  # one token a word
    weird = tok("A photo of 12 cats!")["input_ids"]  # any text encodes (bytes), no stray end-of-text inside
    assert weird.count(tok.eos_token_id) == 1 and weird[-1] == tok.eos_token_id
    _, _, images = dataset_arrays(2, seed=1)
    batch = processor(text=["a circle", "two squares"], images=[to_pil(im) for im in images], return_tensors="pt",
                      padding=True)
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["input_ids"].shape[0] == 2


def test_training_saves_a_checkpoint_that_loads(tmp_path):
    recipe = Recipe(steps=2, batch_size=16, n_train=64, n_eval=16, hidden=32, heads=2, layers=1)
    model, processor, metrics = train(recipe, log_every=0)
    path = save(model, processor, recipe, metrics, tmp_path / "clip")
    loaded, loaded_processor = load_shapes_clip(path)
    captions, _, images = dataset_arrays(4, seed=9)
    np.testing.assert_allclose(clip_scores(loaded, loaded_processor, images, captions),
                               clip_scores(model.eval(), processor, images, captions), atol=1e-4)
    assert json.loads((path / "recipe.json").read_text())["recipe"]["steps"] == 2
    with pytest.raises(FileNotFoundError, match="python -m models.shapes_clip"):
        load_shapes_clip(tmp_path / "missing")
