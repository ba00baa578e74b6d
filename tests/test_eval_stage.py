"""The eval stage: scores recomputed by hand from the files, shard merging, tables, plots, registry errors."""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

from eval.run import evaluate, evaluate_run, expand_run_dirs, load_run, resolve_metric
from eval.tables import build_table, to_csv, to_latex, to_markdown
from tests.test_decode_stage import no_launcher_env  # noqa: F401  (autouse: no RANK/WORLD_SIZE leaks in)


def write_run(run_dir: Path, records: list[dict], decoder: dict | None = None, kind: str = "shapes",
              shards: int = 1, model: str = "tiny", seed: int = 0) -> Path:
    """A run dir by hand (config.yaml + samples*.jsonl), as decode writes it."""
    run_dir.mkdir(parents=True)
    config = {"model": {"name": model, "family": "tiny"}, "decoder": decoder or {"name": "ar"},
              "prompts": {"name": kind, "kind": kind, "limit": 1 + max(r["idx"] for r in records)},
              "sampling": {"cfg_scale": 3.0}, "seed": seed,
              "out_dir": str(run_dir)}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    for rank in range(shards):
        name = "samples.jsonl" if shards == 1 else f"samples-{rank}.jsonl"
        mine = [r for r in records if r["idx"] % shards == rank]
        (run_dir / name).write_text("".join(json.dumps(r) + "\n" for r in mine))
    return run_dir


def speed_record(idx: int, n_forwards: int, latency_s: float, n_tokens: int = 25, peak: int | None = None) -> dict:
    return {"idx": idx, "sample": 0, "prompt": "a circle", "n_tokens": n_tokens, "n_forwards": n_forwards,
            "latency_s": latency_s, "peak_mem_bytes": peak, "accepted_per_forward": [], "tokens": []}


# ---------------------------------------------------------------------------------------------------
# Speed


def test_step_compression_is_the_mean_of_ratios_recomputed_from_the_jsonl(tmp_path):
    rng = np.random.default_rng(0)
    records = [speed_record(i, int(rng.integers(1, 26)), float(rng.uniform(0.1, 2.0)),
                            peak=int(rng.integers(1, 10**9))) for i in range(9)]
    run = write_run(tmp_path / "run", records, shards=2)
    scores = evaluate_run(run, ["speed"])

    by_hand = [json.loads(line) for f in sorted(run.glob("samples*.jsonl")) for line in f.read_text().splitlines()]
    ratios = [r["n_tokens"] / r["n_forwards"] for r in by_hand]
    latencies = sorted(r["latency_s"] for r in by_hand)
    m = json.loads((run / "scores.json").read_text())["metrics"]
    assert m == scores["metrics"]
    assert m["step_compression"] == pytest.approx(sum(ratios) / len(ratios))
    ratio_of_means = sum(r["n_tokens"] for r in by_hand) / sum(r["n_forwards"] for r in by_hand)
    assert m["step_compression"] != pytest.approx(ratio_of_means), "this sample separates the two definitions"
    assert m["latency_mean_s"] == pytest.approx(sum(latencies) / 9)
    assert m["latency_median_s"] == latencies[4]
    assert m["peak_mem_bytes"] == max(r["peak_mem_bytes"] for r in by_hand)
    assert scores["n_images"] == 9 and "protocol" in json.loads((run / "scores.json").read_text())["protocol"]["speed"]


def test_cpu_runs_have_no_peak_memory(tmp_path):
    run = write_run(tmp_path / "run", [speed_record(0, 5, 0.1)])
    assert evaluate_run(run, ["speed"])["metrics"]["peak_mem_bytes"] is None


def test_shard_files_merge_in_index_order(tmp_path):
    run = write_run(tmp_path / "run", [speed_record(i, 5, 0.1) for i in range(7)], shards=3)
    assert [r["idx"] for r in load_run(run).records] == list(range(7))


# ---------------------------------------------------------------------------------------------------
# Shapes score


def _render(caption: str, seed: int):
    from data.shapes import parse_caption, render, scene_for, to_pil

    return to_pil(render(scene_for(np.random.default_rng(seed), parse_caption(caption))))


def test_shapes_score_per_category_and_overall(tmp_path):
    from PIL import Image

    from data.shapes import load_eval_prompts

    prompts = load_eval_prompts()[:12]  # categories interleaved: 2 of each
    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    records, truth = [], {}
    for p in prompts:
        first_of_category = p["category"] not in truth
        truth.setdefault(p["category"], []).append(first_of_category)
        image = _render(p["prompt"], p["idx"]) if first_of_category else Image.new("RGB", (64, 64), "white")
        image.save(run / "images" / f"{p['idx']:06d}.png")
        records.append({**speed_record(p["idx"], 5, 0.1), "prompt": p["prompt"], "category": p["category"],
                        "image": f"images/{p['idx']:06d}.png"})
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "tiny"}, "decoder": {"name": "ar"},
                                                     "prompts": {"name": "shapes", "kind": "shapes",
                                                                 "limit": 12}}))
    m = evaluate_run(run, ["speed", "shapes"])["metrics"]
    for cat, correct in truth.items():
        assert m[f"shapes_{cat}"] == pytest.approx(statistics.fmean(correct)) == 0.5
    assert m["shapes_overall"] == pytest.approx(0.5) and m["shapes_accuracy"] == pytest.approx(0.5)


def test_shapes_metric_is_skipped_for_other_prompt_sets(tmp_path):
    run = write_run(tmp_path / "run", [speed_record(0, 5, 0.1)], kind="coco_longest")
    scores = evaluate_run(run, ["speed", "shapes"])
    assert scores["skipped"] == ["shapes"] and not any(k.startswith("shapes") for k in scores["metrics"])


# ---------------------------------------------------------------------------------------------------
# Registry, run-dir discovery


def test_unknown_or_unwritten_metrics_name_the_fix():
    with pytest.raises(ValueError, match="known:.*speed"):
        resolve_metric("fdi")
    try:
        import eval.fid  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ValueError, match="eval/fid.py is missing"):
            resolve_metric("fid")


def test_run_dirs_expand_globs_and_refuse_missing(tmp_path):
    a = write_run(tmp_path / "sweep" / "a", [speed_record(0, 5, 0.1)])
    b = write_run(tmp_path / "sweep" / "b", [speed_record(0, 5, 0.1)])
    (tmp_path / "sweep" / "not_a_run").mkdir()
    assert expand_run_dirs(None, [str(tmp_path / "sweep" / "*")]) == [a, b]
    assert expand_run_dirs(str(a), [str(b), str(a)]) == [a, b]
    with pytest.raises(FileNotFoundError):
        expand_run_dirs(None, [str(tmp_path / "nothing*")])
    with pytest.raises(ValueError, match="run_dir="):
        expand_run_dirs(None, [])


# ---------------------------------------------------------------------------------------------------
# Tables and plots


def _sweep(tmp_path: Path) -> list[Path]:
    dirs = [write_run(tmp_path / "ar", [speed_record(i, 25, 1.0 + i) for i in range(3)])]
    for w, d in ((4, 2), (16, 2), (4, 5), (16, 5)):
        dirs.append(write_run(tmp_path / f"sjd2_w{w}_d{d}", [speed_record(i, 25 // (w // 2), 0.5) for i in range(3)],
                              decoder={"name": "sjd2", "window": w, "denoise_steps": d, "schedule": "karras"}))
    return dirs


def test_table_puts_runs_side_by_side(tmp_path, capsys):
    dirs = sorted(_sweep(tmp_path), key=lambda d: (d.name != "ar", "w16" in d.name, d.name))  # natural order
    cfg = {"eval": {"metrics": ["speed"], "options": {}}, "run_dirs": [str(tmp_path / "*")],
           "table_dir": str(tmp_path / "tables"), "name": "scores", "formats": ["md", "csv", "tex"],
           "plot": {"enabled": True}}
    scores = evaluate(cfg)
    printed = capsys.readouterr().out
    md = (tmp_path / "tables" / "scores.md").read_text()
    assert md.strip() in printed
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(dirs)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["run", "model", "decoder"] and {"window", "denoise_steps", "step_compression"} <= set(header)
    assert "schedule" not in header, "an option equal in every run is not a column"

    rows = list(csv.DictReader(io.StringIO((tmp_path / "tables" / "scores.csv").read_text())))
    assert [r["run"] for r in rows] == [d.name for d in dirs] == ["ar", "sjd2_w4_d2", "sjd2_w4_d5", "sjd2_w16_d2",
                                                                   "sjd2_w16_d5"]
    for row, d in zip(rows, dirs):
        recs = [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()]
        assert float(row["step_compression"]) == pytest.approx(statistics.fmean(r["n_tokens"] / r["n_forwards"]
                                                                                for r in recs))
        ar_latency = statistics.fmean([1.0, 2.0, 3.0])
        assert float(row["latency_speedup"]) == pytest.approx(ar_latency / statistics.fmean(r["latency_s"] for r in recs))
    assert rows[0]["window"] == "" and rows[1]["window"] == "4"
    tex = (tmp_path / "tables" / "scores.tex").read_text()
    assert r"\toprule" in tex and tex.count(r"\\") == 1 + len(dirs) and r"step\_compression" in tex
    png = tmp_path / "tables" / "scores_sweep.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert len(scores) == len(dirs)


def test_formatters_keep_raw_values_in_csv_and_round_in_markdown():
    header, rows = ["run", "x"], [["a", 1 / 3], ["b", None]]
    assert "0.333" in to_markdown(header, rows) and "| b | - |" in to_markdown(header, rows)
    assert to_csv(header, rows).splitlines() == ["run,x", f"a,{1 / 3!r}", "b,"]
    assert to_latex(["a_b"], [["x%"]]).count(r"\_") == 1


def test_build_table_shows_key_options_even_when_equal(tmp_path):
    d = write_run(tmp_path / "one", [speed_record(0, 5, 0.1)], decoder={"name": "sjd", "window": 16, "init": "random"})
    header, rows = build_table([evaluate_run(d, ["speed"])])
    assert "window" in header and "init" not in header and rows[0][header.index("window")] == 16


def test_plot_is_skipped_when_no_option_varies(tmp_path):
    from eval.plots import pick_axes, plot_sweep

    scores = [evaluate_run(d, ["speed"]) for d in _sweep(tmp_path)]
    assert pick_axes(scores) == ("window", "denoise_steps")
    assert pick_axes(scores, x="denoise_steps") == ("denoise_steps", "window")
    assert plot_sweep(scores[:1], tmp_path / "p.png") is None and not (tmp_path / "p.png").exists()


# ---------------------------------------------------------------------------------------------------
# End to end: decode -> eval on the micro model


def test_decode_then_eval_end_to_end(tmp_path):
    from decode.run import decode_run
    from tests.test_decode_stage import decode_cfg, make_micro_adapter

    adapter = make_micro_adapter()
    dirs = []
    for dec in ("ar", "sjd"):
        dirs.append(tmp_path / dec)
        decode_run(decode_cfg(dirs[-1], f"decoder={dec}", "prompts.limit=3"), adapter=adapter)
    from core.config import compose_config

    cfg = compose_config([f"run_dirs=[{dirs[0]},{dirs[1]}]", f"table_dir={tmp_path}"], config_name="eval")
    from omegaconf import OmegaConf

    scores = evaluate(OmegaConf.to_container(cfg, resolve=True))
    assert [s["decoder"] for s in scores] == ["ar", "sjd"]
    assert scores[0]["metrics"]["step_compression"] == pytest.approx(1.0)
    assert scores[1]["metrics"]["step_compression"] > 1.0
    assert {"shapes_overall", "latency_median_s"} <= set(scores[1]["metrics"])


# ---------------------------------------------------------------------------------------------------
# Demo and bench glue on the micro model


def test_demo_and_bench_run_every_row_through_the_stages(tmp_path):
    from bench.decoders import ForwardTimer, run_bench
    from bench.demo import demo
    from tests.test_decode_stage import make_micro_adapter

    micro = make_micro_adapter()
    rows = (("tiny", "ar"), ("tiny", "sjd"))
    scores, grid = demo(3, 0, tmp_path / "demo", rows=rows, adapters={"tiny": micro}, overrides=["progress=false"])
    assert [s["decoder"] for s in scores] == ["ar", "sjd"] and grid.read_bytes()[:4] == b"\x89PNG"
    assert all(s["n_images"] == 3 for s in scores)

    _, path = run_bench(3, 0, rows=rows, adapters={"tiny": micro}, out_dir=tmp_path / "bench", batch_sizes=(1, 2),
                        n_throughput=3)
    payload = json.loads(path.read_text())
    tp = {(r["decoder"], r["batch_size"]): r for r in payload["throughput"]}
    assert set(tp) == {("ar", 1), ("ar", 2), ("sjd", 1), ("sjd", 2)}  # tiny_sjd2 not loaded: its row left out
    assert tp["sjd", 1]["step_compression"] == tp["sjd", 2]["step_compression"]  # batching is exact per row
    assert all(r["images_per_s"] > 0 and r["n_images"] == 3 for r in tp.values())
    assert "| tiny | ar | 2 |" in payload["throughput_table"] and "1.00x" in payload["throughput_table"]
    saved, table = payload["rows"], payload["table"]
    assert [r["decoder"] for r in saved] == ["ar", "sjd"]
    speedup = [row[table["header"].index("latency_speedup")] for row in table["rows"]]
    lat = [statistics.fmean(x["latency_s"] for x in r["records"]) for r in saved]
    assert speedup == pytest.approx([1.0, lat[0] / lat[1]])
    for r in saved:
        assert 0.0 < r["metrics"]["outside_forward_share"] < 1.0
        assert r["metrics"]["step_compression"] == pytest.approx(statistics.fmean(x["n_tokens"] / x["n_forwards"]
                                                                                  for x in r["records"]))
    timer = ForwardTimer(micro)
    assert timer.layout is micro.layout and timer.vocab_size == micro.vocab_size
