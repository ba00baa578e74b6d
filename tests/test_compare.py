"""eval.compare: paired differences with a cluster bootstrap, on hand-made run dirs and simulated nulls."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from data.geneval_rules import score
from eval.compare import (
    bootstrap_diff,
    comparison_table,
    paired_comparison,
    plot_comparison,
    write_comparison,
)
from eval.tables import to_csv, to_latex, to_markdown

CATS = ("single", "two", "two", "counting")  # category of idx i: CATS[i % 4] (sizes 1/4, 1/2, 1/4)


def write_run(run_dir: Path, correct: dict, seed: int = 0, latency: float = 1.0, prompts: str = "shapes",
              kind: str = "shapes", shuffle: int | None = None, with_shapes: bool = True,
              with_geneval: bool = False) -> Path:
    """A scored run dir by hand: ``correct`` = {(idx, sample): bool}; category (and tag) = CATS[idx % 4]."""
    run_dir.mkdir(parents=True)
    config = {"model": {"name": "tiny"}, "decoder": {"name": "ar"}, "prompts": {"name": prompts, "kind": kind},
              "seed": seed}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    keys = sorted(correct)
    records = [{"idx": i, "sample": s, "seed": 1000 * seed + i, "prompt": "a circle", "category": CATS[i % 4],
                "image": f"images/{i:06d}_{s:02d}.png", "n_tokens": 24, "n_forwards": 6 + (i % 4),
                "latency_s": latency + 0.01 * (i % 5)} for i, s in keys]
    shapes = [{"idx": i, "sample": s, "category": CATS[i % 4], "correct": bool(correct[(i, s)])} for i, s in keys]
    if shuffle is not None:
        random.Random(shuffle).shuffle(records)
        random.Random(shuffle + 1).shuffle(shapes)
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if with_shapes:
        (run_dir / "per_image_shapes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shapes))
    if with_geneval:
        rows = [{"idx": r["idx"], "sample": r["sample"], "tag": r["category"], "correct": r["correct"], "reason": ""}
                for r in shapes]
        (run_dir / "per_image_geneval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def pattern(n: int, samples: int = 1, seed: int = 0) -> dict:
    """Half correct in every category, in a seeded order."""
    rng = np.random.default_rng(seed)
    return {(i, s): bool(rng.random() < 0.5) for i in range(n) for s in range(samples)}


def row(rows: list[dict], metric: str, run: str | None = None) -> dict:
    hits = [r for r in rows if r["metric"] == metric and (run is None or r["run"] == run)]
    assert len(hits) == 1
    return hits[0]


def test_identical_run_gives_zero(tmp_path):
    c = pattern(60)
    base, run = write_run(tmp_path / "base", c), write_run(tmp_path / "run", c)
    rows = paired_comparison([run], base, n_boot=2000)
    assert {r["metric"] for r in rows} == {"shapes_overall", "step_compression", "latency_mean_s"}
    for r in rows:
        assert r["diff"] == 0.0 and r["ci_low"] <= 0.0 <= r["ci_high"] and r["verdict"] == "no difference"
        assert r["n_pairs"] == 60 and r["n_prompts"] == 60 and r["run"] == "run" and r["baseline_run"] == "base"
    assert row(rows, "shapes_overall")["value"] == pytest.approx(score(
        [{"tag": CATS[i % 4], "correct": v} for (i, _), v in c.items()])["overall"])


def test_known_shift_in_one_category(tmp_path):
    n = 160
    c = {(i, 0): (i // 4) % 2 == 0 for i in range(n)}  # half correct in each category
    shifted = dict(c)
    wrong_single = [k for k, v in c.items() if CATS[k[0] % 4] == "single" and not v][:8]  # 8 of 40: +0.2
    shifted.update({k: True for k in wrong_single})
    base = write_run(tmp_path / "base", c, with_geneval=True)
    run = write_run(tmp_path / "run", shifted, latency=1.1, with_geneval=True)
    rows = paired_comparison([run], base)
    assert [r["metric"] for r in rows] == ["shapes_overall", "geneval_overall", "step_compression", "latency_mean_s"]
    r = row(rows, "shapes_overall")
    summary = [score([{"tag": CATS[i % 4], "correct": v} for (i, _), v in d.items()])["overall"] for d in (shifted, c)]
    assert r["diff"] == pytest.approx(summary[0] - summary[1]) and r["diff"] == pytest.approx(0.2 / 3)
    assert r["value"] == pytest.approx(summary[0]) and r["baseline_value"] == pytest.approx(summary[1])
    assert 0 < r["ci_low"] < r["diff"] < r["ci_high"] and r["verdict"] == "higher"
    assert row(rows, "geneval_overall")["diff"] == pytest.approx(0.2 / 3)  # the mean over tags
    plain = paired_comparison([run], base, metrics=["shapes_accuracy"], n_boot=100)[0]
    assert plain["diff"] == pytest.approx(8 / 160)  # the plain mean over images differs from the category mean
    lat = row(rows, "latency_mean_s")
    assert lat["diff"] == pytest.approx(0.1) and lat["verdict"] == "higher" and lat["lower_is_better"]
    assert row(rows, "step_compression")["verdict"] == "no difference"
    verdicts = {t[1]: t[-1] for t in comparison_table(rows)[1]}
    assert verdicts["shapes_overall"] == "higher (better)" and verdicts["latency_mean_s"] == "higher (worse)"


def coverage(sims: int, n_prompts: int, seeds: int, heterogeneous: bool, cluster: bool, n_boot: int = 1000) -> float:
    """Share of simulated null comparisons (same distribution for both runs) whose 95% interval holds 0."""
    rng = np.random.default_rng(123)
    hits = 0
    prompt = np.repeat(np.arange(n_prompts), seeds)
    groups = prompt % 6
    for _ in range(sims):
        if heterogeneous:  # each run has its own per-prompt success rate: one prompt's images correlate
            p_run, p_base = (np.repeat(rng.beta(0.5, 0.5, n_prompts), seeds) for _ in range(2))
        else:
            p_run = p_base = np.full(len(prompt), 0.4)
        a, b = rng.random(len(prompt)) < p_run, rng.random(len(prompt)) < p_base
        ids = prompt if cluster else np.arange(len(prompt))
        res = bootstrap_diff(ids, a, b, groups, groups, n_boot=n_boot, seed=int(rng.integers(1 << 30)))
        hits += res["ci_low"] <= 0.0 <= res["ci_high"]
    return hits / sims


def test_null_coverage_of_the_95_interval():
    assert 0.91 <= coverage(200, 200, 1, heterogeneous=False, cluster=True) <= 0.99
    # 3 seeds of prompts with their own difficulty per run: the cluster bootstrap keeps its coverage,
    # resampling images as if independent would not (the test can tell the two apart)
    assert 0.91 <= coverage(200, 200, 3, heterogeneous=True, cluster=True) <= 0.99
    assert coverage(100, 200, 3, heterogeneous=True, cluster=False, n_boot=500) < 0.9


def test_pairing_ignores_order_and_unpaired_images(tmp_path):
    c, other = pattern(40), pattern(40, seed=5)
    base = write_run(tmp_path / "base", c)
    run = write_run(tmp_path / "run", other)
    ref = paired_comparison([run], base, n_boot=500)
    extra_base = {**c, (40, 0): True, (3, 1): False}  # a prompt and a sample the run does not have
    extra_run = {**other, (41, 0): True}
    base2 = write_run(tmp_path / "b2" / "base", extra_base, shuffle=1)
    run2 = write_run(tmp_path / "b2" / "run", extra_run, shuffle=2)
    got = paired_comparison([run2], base2, n_boot=500)
    for r, g in zip(ref, got):
        assert {k: g[k] for k in ("diff", "ci_low", "ci_high", "value", "n_pairs")} == \
               {k: r[k] for k in ("diff", "ci_low", "ci_high", "value", "n_pairs")}
        assert g["n_unpaired_run"] == 1 and g["n_unpaired_baseline"] == 2 and g["n_prompts"] == 40


def test_three_seeds_pair_seed_with_seed(tmp_path):
    per_seed = {s: pattern(30, seed=10 + s) for s in range(3)}
    base_content = {**per_seed, 1: {k: v for k, v in per_seed[1].items() if k[0] < 20}}  # seed 1: 20 prompts
    base = [write_run(tmp_path / "base" / f"s{s}", base_content[s], seed=s) for s in range(3)]
    run_content = {**per_seed, 1: {**per_seed[1], **{(i, 0): True for i in range(20, 30)}}}
    run = [write_run(tmp_path / "run" / f"s{s}", run_content[s], seed=s, shuffle=s) for s in (2, 0, 1)]
    r = paired_comparison([run], base, metrics=["shapes_overall"], n_boot=1000)[0]
    assert r["n_pairs"] == 80 and r["n_prompts"] == 30 and r["n_unpaired_run"] == 10 and r["run"] == "run"
    assert r["diff"] == 0.0 and r["ci_low"] == 0.0 == r["ci_high"]  # seed with seed: every pair equal
    one = paired_comparison([run[2]], base[1], metrics=["shapes_overall"], n_boot=10)[0]  # a single seed each
    assert one["n_pairs"] == 20 and one["diff"] == 0.0
    # a run that differs: the interval is the cluster bootstrap over idx of the seed-matched pairs, by hand
    other = {s: pattern(30, seed=20 + s) for s in range(3)}
    run2 = [write_run(tmp_path / "run2" / f"s{s}", other[s], seed=s) for s in range(3)]
    got = paired_comparison([run2], base, metrics=["shapes_overall"], n_boot=2000, seed=4)[0]
    keys = [(s, k) for s in range(3) for k in base_content[s]]
    by_hand = {name: bootstrap_diff(ids, [other[s][k] for s, k in keys], [base_content[s][k] for s, k in keys],
                                    [CATS.index(CATS[k[0] % 4]) for _, k in keys],
                                    [CATS.index(CATS[k[0] % 4]) for _, k in keys], n_boot=2000, seed=4)
               for name, ids in (("cluster", [k[0] for _, k in keys]), ("iid", range(len(keys))))}
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((by_hand["cluster"]["ci_low"], by_hand["cluster"]["ci_high"]))
    assert (got["ci_low"], got["ci_high"]) != pytest.approx((by_hand["iid"]["ci_low"], by_hand["iid"]["ci_high"]))
    assert got["diff"] == pytest.approx(by_hand["cluster"]["diff"])


def test_600_images_10000_resamples_under_a_second():
    rng = np.random.default_rng(0)
    prompt = np.repeat(np.arange(200), 3)
    a, b = rng.random(600) < 0.5, rng.random(600) < 0.5
    times = []
    for _ in range(3):  # the best of three: a busy machine slows one call, not the code
        t0 = time.perf_counter()
        bootstrap_diff(prompt, a, b, prompt % 6, prompt % 6, n_boot=10000)
        times.append(time.perf_counter() - t0)
    assert min(times) < 1.0


def test_refusals(tmp_path):
    c = pattern(20)
    base = write_run(tmp_path / "base", c)
    coco = write_run(tmp_path / "coco", c, prompts="coco_sample", kind="coco_sample")
    with pytest.raises(ValueError, match="same prompts"):
        paired_comparison([coco], base)
    other_seed = write_run(tmp_path / "seed1", c, seed=1)
    with pytest.raises(ValueError, match="share no image .*same prompts and seed"):
        paired_comparison([other_seed], base)
    unscored = write_run(tmp_path / "unscored", c, with_shapes=False)
    with pytest.raises(ValueError, match=r"no per_image_shapes.jsonl .*run python -m eval on it first"):
        paired_comparison([unscored], base, metrics=["shapes_overall"])
    with pytest.raises(ValueError, match="run python -m eval on it first"):  # the default list: one dir scored
        paired_comparison([unscored], base)
    with pytest.raises(ValueError, match="one run dir per seed"):
        paired_comparison([[write_run(tmp_path / "dup0", c), write_run(tmp_path / "dup", c)]], base)
    with pytest.raises(ValueError, match="known:"):
        paired_comparison([unscored], base, metrics=["shapes_score"])
    with pytest.raises(ValueError, match="no per_image_geneval"):
        paired_comparison([unscored], base, metrics=["geneval_overall"])
    with pytest.raises(ValueError, match=r"includes the baseline .*compared with itself"):
        paired_comparison([[write_run(tmp_path / "s1", c, seed=1), base]], base)
    for call in (lambda: paired_comparison([coco], base), lambda: paired_comparison([unscored], base)):
        with pytest.raises(ValueError) as e:
            call()
        assert "\n" not in str(e.value)


def test_writers_and_fid_row(tmp_path):
    c = pattern(30)
    base = write_run(tmp_path / "base", c)
    run = write_run(tmp_path / "run", pattern(30, seed=3), latency=0.5)
    for d, fid in ((base, 12.0), (run, 10.5)):
        (d / "scores.json").write_text(json.dumps({"metrics": {"fid": fid}}))
    rows = paired_comparison([run], base, metrics=["shapes_overall", "latency_mean_s", "fid"], n_boot=500)
    fid = row(rows, "fid")
    assert fid["diff"] == pytest.approx(-1.5) and fid["ci_low"] is None and "set-level" in fid["note"]
    assert row(rows, "latency_mean_s")["verdict"] == "lower"
    header, table = comparison_table(rows)
    assert header[:8] == ["run", "metric", "value", "baseline", "diff", "ci_low", "ci_high", "n_pairs"]
    assert "lower (better)" in to_markdown(header, table) and "no interval" in to_csv(header, table)
    assert r"\begin{tabular}" in to_latex(header, table)
    png = plot_comparison(rows, tmp_path / "cmp.png")
    assert png.stat().st_size > 1000
    written = write_comparison(rows, tmp_path / "out" / "cmp")
    assert sorted(p.suffix for p in written) == [".csv", ".json", ".md", ".png", ".tex"]


def test_a_settings_seed_dirs_are_labelled_as_one_glob(tmp_path):
    """Sibling seed dirs of one setting are named by their common stem; groups that would share a label
    fall back to the full list, so two rows never carry the same name."""
    shapes = tmp_path / "shapes"
    base = [write_run(shapes / f"ar_x_s{s}", pattern(8, seed=s), seed=s) for s in range(2)]
    run = [write_run(shapes / f"sjd2_w64_s{s}", pattern(8, seed=5 + s), seed=s) for s in range(2)]
    r = paired_comparison([run], base, metrics=["shapes_overall"], n_boot=10)[0]
    assert (r["run"], r["baseline_run"]) == ("sjd2_w64_s*", "ar_x_s*")
    more = [write_run(shapes / f"sjd2_w64_s{s}", pattern(8, seed=9 + s), seed=s - 2) for s in (2, 3)]
    rows = paired_comparison([run, more], base, metrics=["shapes_overall"], n_boot=10)
    assert [x["run"] for x in rows] == ["sjd2_w64_s0+sjd2_w64_s1", "sjd2_w64_s2+sjd2_w64_s3"]


def test_speed_and_quality_rows_also_draw_the_frontier(tmp_path):
    base = write_run(tmp_path / "base", pattern(30))
    run = write_run(tmp_path / "run", pattern(30, seed=3))
    rows = paired_comparison([run], base, metrics=["shapes_overall", "step_compression"], n_boot=200)
    assert row(rows, "step_compression")["value"] == pytest.approx(24 / np.mean([6 + i % 4 for i in range(30)]), rel=0.05)
    written = write_comparison(rows, tmp_path / "out" / "cmp")
    frontier = tmp_path / "out" / "cmp_frontier.png"
    assert frontier in written and frontier.stat().st_size > 1000
    quality_only = [r for r in rows if r["metric"] == "shapes_overall"]
    assert Path(tmp_path / "q_frontier.png") not in write_comparison(quality_only, tmp_path / "q")
