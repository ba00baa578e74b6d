"""The geneval metric (eval/geneval.py) end to end: shapes detector on a hand-built run dir, bad inputs, and the
Mask2Former + CLIP path on tiny random checkpoints."""
import dataclasses
import json
import string

import numpy as np
import pytest

from data import shapes as S
from data.shapes_check import caption_metadata
from eval.geneval import geneval_metric
from eval.images import per_image_path
from eval.run import RunData

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def wrong_spec(spec):
    """A spec the image of which must fail ``spec``: flipped relation, other colour, count + 1, other shape."""
    p = spec.phrases[0]
    if spec.relation:
        return dataclasses.replace(spec, relation=OPPOSITE[spec.relation])
    if p.color:
        other = next(c for c in S.COLORS if c not in (p.color, getattr(spec.phrases[-1], "color", None)))
        return dataclasses.replace(spec, phrases=(dataclasses.replace(p, color=other),) + spec.phrases[1:])
    if p.count is not None:
        return dataclasses.replace(spec, phrases=(dataclasses.replace(p, count=p.count % 4 + 1),))
    used = {q.shape for q in spec.phrases}
    return dataclasses.replace(spec, phrases=(dataclasses.replace(p, shape=next(s for s in S.SHAPES if s not in used)),)
                               + spec.phrases[1:])


def make_run(tmp_path, prompts, images, metas=None):
    """A run dir as decode writes it: images/, records, geneval/<idx>/metadata.jsonl."""
    (tmp_path / "images").mkdir(parents=True)
    records = []
    for i, (prompt, img) in enumerate(zip(prompts, images)):
        idx, sample = i // 2, i % 2
        name = f"images/{idx:05d}_{sample}.png"
        S.to_pil(img).save(tmp_path / name)
        meta = (metas or {}).get(idx) or caption_metadata(prompt)
        folder = tmp_path / "geneval" / f"{idx:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        records.append({"idx": idx, "sample": sample, "prompt": prompt, "category": meta["tag"], "image": name})
    return RunData(tmp_path, {"prompts": {"kind": "geneval"}}, records)


@pytest.fixture
def shapes_run(tmp_path):
    """Two images per prompt: sample 0 renders the caption, sample 1 a deliberately wrong scene."""
    rows = S.load_eval_prompts()[:18]  # three prompts of each tag
    prompts, images = [], []
    for r in rows:
        spec, rng = S.parse_caption(r["prompt"]), np.random.default_rng([7, r["idx"]])
        prompts += [r["prompt"], r["prompt"]]
        images += [S.render(S.scene_for(rng, spec)), S.render(S.scene_for(rng, wrong_spec(spec)))]
    return make_run(tmp_path, prompts, images)


def test_shapes_detector_scores_right_images_1_and_wrong_ones_0(shapes_run):
    out = geneval_metric(shapes_run, {"detector": "shapes"})
    rows = [json.loads(ln) for ln in per_image_path(shapes_run.run_dir, "geneval").read_text().splitlines()]
    assert len(rows) == out["geneval_n"] == 36 and out["geneval_n_unreadable"] == 0
    assert all(r["correct"] == (r["sample"] == 0) for r in rows), [r for r in rows if r["correct"] != (r["sample"] == 0)]
    assert all(r["reason"] == "" for r in rows if r["correct"]) and all(r["reason"] for r in rows if not r["correct"])
    assert out["geneval_overall"] == pytest.approx(0.5)
    assert {k for k in out if k.startswith("geneval_")} >= {f"geneval_{t}" for t in S.CATEGORIES}
    assert all(out[f"geneval_{t}"] == pytest.approx(0.5) for t in S.CATEGORIES)


def test_a_corrupt_png_is_named_and_the_others_score(shapes_run):
    bad = shapes_run.run_dir / shapes_run.records[3]["image"]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = geneval_metric(shapes_run, {"detector": "shapes"})
    assert out["geneval_n"] == 35 and out["geneval_n_unreadable"] == 1
    assert str(bad) in out["geneval_unreadable"][0]


def test_missing_metadata_names_the_fix(shapes_run):
    (shapes_run.run_dir / "geneval" / "00004" / "metadata.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"00004.*prompts=geneval"):
        geneval_metric(shapes_run, {"detector": "shapes"})


def test_metadata_of_another_prompt_set_and_bad_options_are_refused(shapes_run):
    path = shapes_run.run_dir / "geneval" / "00002" / "metadata.jsonl"
    path.write_text(json.dumps(caption_metadata("a red circle")) + "\n")
    with pytest.raises(ValueError, match="another prompt set"):
        geneval_metric(shapes_run, {"detector": "shapes"})
    with pytest.raises(ValueError, match="known"):
        geneval_metric(shapes_run, {"detector": "shapes", "treshold": 0.5})
    with pytest.raises(ValueError, match="detector_model"):
        geneval_metric(shapes_run, {"detector": "facebook/mask2former-swin-small-coco-instance"})


def tiny_checkpoints(root):
    """A random Mask2Former (tiny Swin) and a random CLIP with a character-level tokenizer, saved to ``root``."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPTokenizer,
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessorPil,
        SwinConfig,
    )

    torch.manual_seed(0)
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    names = ["dog", "mouse"]
    cfg = Mask2FormerConfig(backbone_config=swin, hidden_dim=32, mask_feature_size=32, feature_size=32, num_queries=8,
                            encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32,
                            encoder_feedforward_dim=32, common_stride=4,
                            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(root / "m2f")
    Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(root / "m2f")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + "-":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(root / "clip")
    text = {"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(root / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    return root / "m2f", root / "clip"


def test_mask2former_and_clip_run_end_to_end_on_tiny_random_checkpoints(tmp_path):
    m2f, clip = tiny_checkpoints(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    metas = {0: {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a red dog"},
             1: {"tag": "counting", "include": [{"class": "computer mouse", "count": 2}],
                 "exclude": [{"class": "computer mouse", "count": 3}], "prompt": "two computer mouses"}}
    run = make_run(tmp_path / "run", ["a red dog"] * 2 + ["two computer mouses"] * 2, images, metas)
    out = geneval_metric(run, {"detector_model": str(m2f), "color_model": str(clip), "threshold": 0.0,
                               "counting_threshold": 0.0, "device": "cpu"})
    assert out["geneval_n"] == 4 and 0.0 <= out["geneval_overall"] <= 1.0
    assert set(out) >= {"geneval_colors", "geneval_counting", "geneval_n_unreadable"}
    rows = [json.loads(ln) for ln in per_image_path(run.run_dir, "geneval").read_text().splitlines()]
    assert [(r["idx"], r["sample"], r["tag"]) for r in rows] == [(0, 0, "colors"), (0, 1, "colors"),
                                                                 (1, 0, "counting"), (1, 1, "counting")]
    assert all(isinstance(r["correct"], bool) and isinstance(r["reason"], str) for r in rows)
    # the colour clause reached CLIP: either correct, or a verdict naming the colours it found
    colour_rows = rows[:2]
    assert all(r["correct"] or "expected red dog>=1, found 1 " in r["reason"] for r in colour_rows), colour_rows
    # the checkpoint's COCO label "mouse" is GenEval's "computer mouse"
    assert not any("found 0" in r["reason"] for r in rows[2:]), rows[2:]


def test_missing_detector_weights_name_the_hub_id(tmp_path, shapes_run):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(FileNotFoundError, match=r"no_such_checkpoint.*hf download"):
        geneval_metric(shapes_run, {"detector_model": str(missing), "device": "cpu"})


def test_colour_crops_put_the_mask_on_genevals_grey_and_cut_the_box():
    from data.geneval_rules import Detection
    from eval.geneval import GREY, masked_crop

    img = S.COLORS["red"] * np.ones((64, 64, 1), np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:20, 30:50] = True
    mask[10, 30] = False
    crop = np.asarray(masked_crop(S.to_pil(img), Detection("dog", 1.0, (30.0, 10.0, 50.0, 20.0), mask)))
    assert crop.shape == (10, 20, 3)
    assert tuple(crop[0, 0]) == GREY and tuple(crop[5, 5]) == S.COLORS["red"]
