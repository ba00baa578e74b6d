"""`python -m eval compare.baseline=... compare.runs=[...]` (issue 20 item 4), through the real command line:
a baseline among its own runs is refused, a refused comparison writes nothing at all, and a comparison's
tables land only in its own folder (never over the tables of the runs' shared parent)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_helpers import assert_kept, assert_one_line_error, snapshot, stage
from tests.test_decode_stage import decode_cfg, make_micro_adapter


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/{ar,sjd,file}: two decoders on the same shapes prompts, one run on another prompt set."""
    from decode.run import decode_run

    root = tmp_path_factory.mktemp("cmp")
    adapter = make_micro_adapter()
    for name, args in (("ar", []), ("sjd", ["decoder=sjd"])):
        decode_run(decode_cfg(root / "runs" / name, "prompts.limit=3", *args), adapter=adapter)
    prompts = root / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    decode_run(decode_cfg(root / "runs" / "file", "prompts=file", f"prompts.path={prompts}", "prompts.limit=null"),
               adapter=adapter)
    (root / "runs" / "scores.md").write_text("| my own table |\n")  # the user's table in the shared parent
    return root


def refused(root: Path, *args: str, needle: str) -> None:
    before = snapshot(root)
    assert_one_line_error(stage("eval", *args, cwd=root), needle)
    assert snapshot(root) == before  # nothing changed and nothing new: no scores.json, no table


def test_a_baseline_among_the_runs_is_refused(runs):
    ar, sjd = runs / "runs" / "ar", runs / "runs" / "sjd"
    refused(runs, f"compare.baseline={ar}", f"compare.runs=[{ar}]", needle="includes the baseline")
    refused(runs, f"compare.baseline={ar}", f"compare.runs=[[{sjd},{ar}]]", needle="compared with itself")


def test_a_refused_comparison_writes_nothing(runs):
    ar, sjd, other = (runs / "runs" / n for n in ("ar", "sjd", "file"))
    refused(runs, f"compare.baseline={ar}", f"compare.runs=[{other}]", needle="same prompts")
    refused(runs, f"compare.baseline={ar}", f"compare.runs=[{sjd}]", "compare.metrics=[clip_score]",
            needle="this eval does not score clip_score")
    refused(runs, f"compare.baseline={ar}", f"compare.runs=[{sjd}]", "compare.metrics=[shapes_score]",
            needle="cannot compare metric 'shapes_score'")


def test_a_comparison_writes_its_tables_only_in_its_own_folder(runs):
    ar, sjd = runs / "runs" / "ar", runs / "runs" / "sjd"
    before = snapshot(runs)
    proc = stage("eval", f"compare.baseline={ar}", f"compare.runs=[{sjd}]", "compare.n_boot=200", cwd=runs)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_kept(before, runs)  # the user's runs/scores.md above all
    folder = runs / "runs" / "compare_ar_vs_sjd"
    new = sorted(str(Path(k)) for k in set(snapshot(runs)) - set(before))
    assert all(k.startswith("runs/compare_ar_vs_sjd/") or Path(k).parent.name in ("ar", "sjd") for k in new), new
    assert (folder / "scores_compare.md").is_file() and (folder / "scores.md").is_file()
    assert {Path(k).name for k in new if not k.startswith("runs/compare")} <= {"scores.json", "per_image_shapes.jsonl"}
    table = stage("eval", f"compare.baseline={ar}", f"compare.runs=[{sjd}]", "compare.n_boot=200",
                  f"table_dir={runs / 'mine'}", cwd=runs)
    assert table.returncode == 0 and (runs / "mine" / "scores_compare.csv").is_file()
