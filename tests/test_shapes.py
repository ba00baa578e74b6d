"""The shapes world: sampling, rendering, the grammar and the pixel checker."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data import shapes as S
from data import shapes_check as C

N_SCENES = 300


@pytest.fixture(scope="module")
def examples():
    """(captions, categories, images [N, 64, 64, 3], scenes), seed 123."""
    rows = [S.example(123, i) for i in range(N_SCENES)]
    captions, cats, scenes = zip(*rows)
    return list(captions), list(cats), S.render_batch(scenes), list(scenes)


def test_ground_truth_scores_one_overall_and_per_category(examples):
    captions, cats, images, _ = examples
    results = [C.check(img, cap) for img, cap in zip(images, captions)]
    assert [r["category"] for r in results] == cats
    scores = C.score(results)
    assert set(scores) == set(S.CATEGORIES) | {"overall"}
    for name, value in scores.items():
        assert value >= 0.99, (name, value)


def test_checker_accepts_pil_and_other_sizes(examples):
    captions, _, images, scenes = examples
    for i in range(12):
        assert C.check(S.to_pil(images[i]), captions[i])["correct"]
        assert C.check(S.render(scenes[i], size=128), captions[i])["correct"]


def test_mismatched_pairs_score_low(examples):
    captions, _, images, _ = examples
    shifted = captions[7:] + captions[:7]  # each image judged against another example's caption
    results = [C.check(img, cap) for img, cap in zip(images, shifted)]
    assert C.score(results)["overall"] < 0.35
    # the specific categories must fail almost always
    for cat in ("position", "color_attr"):
        assert C.score(results)[cat] < 0.15


def test_blank_image_satisfies_nothing():
    blank = np.full((64, 64, 3), 255, np.uint8)
    for row in S.load_eval_prompts()[:30]:
        assert not C.check(blank, row["prompt"])["correct"]


def test_checker_reads_shape_colour_and_relation():
    a = S.Obj("circle", "red", 12, 32, 16)
    b = S.Obj("triangle", "blue", 52, 32, 16)
    img = S.render(S.Scene((a, b)))
    found = sorted((o["shape"], o["color"]) for o in C.check(img, "a circle")["found"])
    assert found == [("circle", "red"), ("triangle", "blue")]
    assert C.check(img, "a circle left of a triangle")["correct"]
    assert not C.check(img, "a circle right of a triangle")["correct"]
    assert not C.check(img, "a circle above a triangle")["correct"]
    assert C.check(img, "a red circle and a blue triangle")["correct"]
    assert not C.check(img, "a blue circle and a red triangle")["correct"]
    assert not C.check(img, "two circles")["correct"]
    assert C.check(img, "one circle")["correct"]
    assert not C.check(img, "a square")["correct"]


def test_objects_disjoint_with_margin_and_inside_canvas(examples):
    """Every object is its own connected component: no overlap, no touching, no clipping."""
    _, _, images, scenes = examples
    for img, scene in zip(images, scenes):
        assert 1 <= len(scene.objects) <= 4
        for o in scene.objects:
            assert o.size / 2 <= o.cx <= 64 - o.size / 2 and o.size / 2 <= o.cy <= 64 - o.size / 2
        assert len(C.detect(img)) == len(scene.objects)


def test_scene_matches_spec(examples):
    captions, cats, _, scenes = examples
    for cap, cat, scene in zip(captions, cats, scenes):
        spec = S.parse_caption(cap)
        assert spec.category == cat
        assert len(scene.objects) == sum(p.count or 1 for p in spec.phrases)
        for p in spec.phrases:
            assert any(o.shape == p.shape and (p.color is None or o.color == p.color) for o in scene.objects)


def test_categories_and_colours_are_roughly_uniform():
    """Chi-square goodness of fit over 1200 draws (fixed seed; 5 and 5 dof, critical 20.5 at p=0.001)."""
    n = 1200
    rows = [S.example(7, i) for i in range(n)]
    cats = np.array([sum(c == k for _, c, _ in rows) for k in S.CATEGORIES])
    exp = n / len(S.CATEGORIES)
    assert ((cats - exp) ** 2 / exp).sum() < 20.5
    colours = [o.color for _, c, s in rows if c == "single_object" for o in s.objects]
    counts = np.array([colours.count(k) for k in S.COLORS])
    exp = len(colours) / len(S.COLORS)
    assert ((counts - exp) ** 2 / exp).sum() < 20.5


@pytest.mark.parametrize("caption", [
    "a hexagon", "a circle next to a square", "three circle", "a circles", "five circles",
    "a red circle left of two squares", "", "a big circle", "four circles and a square",
])
def test_outside_grammar_raises(caption):
    with pytest.raises(ValueError, match="grammar"):
        S.parse_caption(caption)
    with pytest.raises(ValueError, match="grammar"):
        C.check(np.full((64, 64, 3), 255, np.uint8), caption)


def test_parse_round_trips_canonical_text():
    rng = np.random.default_rng(0)
    for _ in range(200):
        spec = S.sample_spec(rng)
        assert S.parse_caption(spec.text()) == spec


def test_vocab_covers_every_caption():
    vocab = set(S.VOCAB)
    assert len(S.VOCAB) == len(vocab) <= 100
    for i in range(500):
        caption, _, _ = S.example(3, i)
        assert set(caption.split()) <= vocab, caption


def test_determinism():
    a = [S.example(5, i) for i in range(20)]
    b = [S.example(5, i) for i in range(20)]
    c = [S.example(6, i) for i in range(20)]
    assert a == b
    assert a != c
    img_a = np.stack([S.render(s) for _, _, s in a])
    img_b = np.stack([img for _, _, img in S.dataset(20, 5)])
    assert np.array_equal(img_a, img_b)
    rng1, rng2 = np.random.default_rng(9), np.random.default_rng(9)
    assert S.sample_example(rng1, "position") == S.sample_example(rng2, "position")


def test_render_is_flat_palette():
    _, _, scene = S.example(1, 0)
    img = S.render(scene)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    palette = {S.BACKGROUND, *S.COLORS.values()}
    assert {tuple(int(v) for v in px) for px in img.reshape(-1, 3)} <= palette


def test_colours_well_separated():
    cols = np.array([S.BACKGROUND, *S.COLORS.values()], dtype=float)
    d = np.sqrt(((cols[:, None] - cols[None]) ** 2).sum(-1))
    assert len(S.COLORS) >= 6
    assert d[~np.eye(len(cols), dtype=bool)].min() > C.COLOR_THRESHOLD


def test_eval_prompts_file():
    rows = S.load_eval_prompts()
    assert len(rows) == 200
    assert [r["idx"] for r in rows] == list(range(200))
    counts = {c: sum(r["category"] == c for r in rows) for c in S.CATEGORIES}
    assert min(counts.values()) >= 33 and max(counts.values()) <= 34, counts
    for r in rows:
        assert S.parse_caption(r["prompt"]).category == r["category"]


def test_eval_prompts_file_is_regenerable(tmp_path):
    path = S.write_eval_prompts(tmp_path / "eval.jsonl")
    assert path.read_text() == S.EVAL_PATH.read_text()
    assert json.loads(path.read_text().splitlines()[0])["idx"] == 0


def test_load_eval_prompts_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.shapes"):
        S.load_eval_prompts(tmp_path / "nope.jsonl")
