"""The eval stage refuses partial runs unless told, shows n_images of the prompt set's count, names
unreadable images while scoring the others, and logs to wandb offline without a network."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from eval.run import PartialRun, evaluate
from tests.test_decode_stage import no_launcher_env  # noqa: F401  (autouse: no RANK/WORLD_SIZE leaks in)


def _render(caption: str, seed: int):
    import numpy as np

    from data.shapes import parse_caption, render, scene_for, to_pil

    return to_pil(render(scene_for(np.random.default_rng(seed), parse_caption(caption))))


def shapes_run(run: Path, n_prompts: int, idx: list[int], shards: int = 1) -> Path:
    """A decoded-looking run dir of the first ``n_prompts`` shapes prompts holding images ``idx``."""
    from data.shapes import load_eval_prompts

    prompts = load_eval_prompts()[:n_prompts]
    (run / "images").mkdir(parents=True)
    config = {"model": {"name": "tiny"}, "decoder": {"name": "ar"}, "sampling": {}, "seed": 0,
              "prompts": {"name": "shapes", "kind": "shapes", "limit": n_prompts}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for rank in range(shards):
        lines = []
        for p in prompts:
            if p["idx"] in idx and p["idx"] % shards == rank:
                name = f"images/{p['idx']:06d}.png"
                _render(p["prompt"], p["idx"]).save(run / name)
                lines.append(json.dumps({"idx": p["idx"], "sample": 0, "prompt": p["prompt"], "image": name,
                                         "category": p["category"], "n_tokens": 25, "n_forwards": 5,
                                         "latency_s": 0.1, "peak_mem_bytes": None}) + "\n")
        (run / ("samples.jsonl" if shards == 1 else f"samples-{rank}.jsonl")).write_text("".join(lines))
    return run


def _cfg(run: Path, **extra) -> dict:
    return {"eval": {"name": "default", "metrics": ["speed", "shapes"]}, "run_dir": str(run), **extra}


def test_a_missing_shard_is_refused_before_anything_is_written(tmp_path):
    run = shapes_run(tmp_path / "run", 8, list(range(8)), shards=2)
    (run / "samples-1.jsonl").unlink()
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(PartialRun, match=r"holds 4 of 8 images \(first missing: idx 1; records files: "
                                         r"samples-0.jsonl\).*allow_partial=true"):
        evaluate(_cfg(run))
    assert sorted(p.name for p in run.iterdir()) == before  # no scores.json, no table


def test_allow_partial_scores_what_is_there_and_the_table_says_of_how_many(tmp_path, capsys):
    run = shapes_run(tmp_path / "run", 8, [0, 1, 2, 3, 4])
    scores = evaluate(_cfg(run, allow_partial=True))[0]
    assert (scores["n_images"], scores["n_prompts_images"]) == (5, 8)
    table = (run / "scores.md").read_text()
    header = [h.strip() for h in table.splitlines()[0].strip("|").split("|")]
    row = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    assert row[header.index("n_images")] == "5" and row[header.index("of_n")] == "8"


def test_an_unreadable_image_is_named_and_the_others_are_scored(tmp_path, capsys):
    run = shapes_run(tmp_path / "run", 6, list(range(6)))
    (run / "images" / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    m = evaluate(_cfg(run))[0]["metrics"]
    assert m["shapes_n_unreadable"] == 1 and "000002.png" in m["shapes_unreadable"][0]
    assert m["shapes_n_scored"] == 5
    assert "000002.png" in capsys.readouterr().err


def test_wandb_offline_logs_the_table_and_grids_without_a_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = shapes_run(tmp_path / "run", 4, list(range(4)))
    evaluate(_cfg(run, wandb={"mode": "offline", "project": "sjd2-test"}))
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    media = list(runs[0].rglob("*.png"))
    assert media, "the image grid was not logged"


def test_compare_scores_both_runs_and_writes_paired_differences_with_intervals(tmp_path):
    from PIL import Image

    base = shapes_run(tmp_path / "base", 24, list(range(24)))
    worse = shapes_run(tmp_path / "worse", 24, list(range(24)))
    for i in range(0, 24, 2):  # every other image blank: those prompts fail in `worse`
        Image.new("RGB", (64, 64), "white").save(worse / "images" / f"{i:06d}.png")
    evaluate({"eval": {"name": "default", "metrics": ["speed", "shapes"]}, "table_dir": str(tmp_path / "t"),
              "name": "cmp", "compare": {"baseline": str(base), "runs": [str(worse)], "n_boot": 2000}})
    rows = json.loads((tmp_path / "t" / "cmp_compare.json").read_text())["rows"]
    shapes = next(r for r in rows if r["metric"] == "shapes_overall")
    b = json.loads((base / "scores.json").read_text())["metrics"]["shapes_overall"]
    w = json.loads((worse / "scores.json").read_text())["metrics"]["shapes_overall"]
    assert shapes["diff"] == pytest.approx(w - b) and shapes["diff"] < 0
    assert shapes["ci_high"] < 0 and shapes["n_pairs"] == 24
    assert (tmp_path / "t" / "cmp_compare.md").is_file() and (tmp_path / "t" / "cmp_compare.png").is_file()


def test_compare_needs_both_a_baseline_and_runs(tmp_path):
    run = shapes_run(tmp_path / "run", 2, [0, 1])
    with pytest.raises(ValueError, match="compare.baseline is set but compare.runs is empty"):
        evaluate({**_cfg(run), "compare": {"baseline": str(run)}})
