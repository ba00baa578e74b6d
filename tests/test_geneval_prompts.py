"""GenEval's prompt file: the loader and the GenEval folder contract of the decode stage.

The benchmark's own file is not committed (`make geneval-prompts` fetches it). :func:`geneval_file` is the
one place tests find it: ``../shared/data/geneval/`` beside the repository, else ``data/geneval/``; without
either, the tests run on a file in GenEval's format that they write (a user's clone passes as well).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import compose_config
from core.rundir import read_records
from data.prompts import GENEVAL_PATH, load_prompts
from decode.run import decode_run
from tests.test_decode_stage import decode_cfg, make_micro_adapter, no_launcher_env  # noqa: F401  (autouse)

REPO = Path(__file__).resolve().parents[1]
REAL_FILES = (REPO.parent / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl", GENEVAL_PATH)
BENCHMARK_COUNTS = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                    "color_attr": 100}  # 553 prompts
WRITTEN_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "cow", "count": 1}, {"class": "clock", "count": 1}],
     "prompt": "a photo of a cow and a clock"},
    {"tag": "counting", "include": [{"class": "carrot", "count": 3}], "exclude": [{"class": "carrot", "count": 4}],
     "prompt": "a photo of three carrots"},
    {"tag": "colors", "include": [{"class": "bicycle", "count": 1, "color": "red"}],
     "prompt": "a photo of a red bicycle"},
    {"tag": "position", "include": [{"class": "cow", "count": 1},
                                    {"class": "bench", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a bench left of a cow"},
    {"tag": "color_attr", "include": [{"class": "clock", "count": 1, "color": "blue"},
                                      {"class": "carrot", "count": 1, "color": "green"}],
     "prompt": "a photo of a blue clock and a green carrot"},
    {"tag": "counting", "include": [{"class": "bench", "count": 2}], "exclude": [{"class": "bench", "count": 3}],
     "prompt": "a photo of two benches"},
]


@pytest.fixture
def geneval_file(tmp_path) -> tuple[Path, dict[str, int]]:
    """(a GenEval prompt file, its prompt count per tag): the benchmark's own where present."""
    for path in REAL_FILES:
        if path.is_file():
            return path, BENCHMARK_COUNTS
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in WRITTEN_LINES))
    counts: dict[str, int] = {}
    for line in WRITTEN_LINES:
        counts[line["tag"]] = counts.get(line["tag"], 0) + 1
    return path, counts


def test_geneval_prompts_match_the_benchmark(geneval_file):
    path, expected = geneval_file
    prompts = load_prompts(compose_config(["prompts=geneval", f"prompts.path={path}"]).prompts)
    counts = {}
    for p in prompts:
        counts[p.category] = counts.get(p.category, 0) + 1
    assert len(prompts) == sum(expected.values())
    assert counts == expected
    assert prompts[0].meta["include"] and prompts[0].prompt == prompts[0].meta["prompt"]


@pytest.fixture(scope="module")
def adapter():
    return make_micro_adapter()


def test_geneval_folder_contract(tmp_path, adapter, geneval_file, monkeypatch):
    import decode.run
    from decode.api import generate

    # GenEval's words are outside tiny's vocabulary: the stage's tokenizer check would refuse them (rightly)
    monkeypatch.setattr(decode.run, "check_prompt_lengths", lambda *args: None)

    path = geneval_file[0]

    def shapes_text(adapter, text, decoder_cfg, sampling, generator):  # GenEval words are not in tiny's vocab
        return generate(adapter, "a circle", decoder_cfg, sampling, generator)

    out = tmp_path / "run"
    decode_run(decode_cfg(out, "prompts=geneval", f"prompts.path={path}", "prompts.limit=2",
                          "prompts.images_per_prompt=2"), adapter=adapter, generate_fn=shapes_text)
    lines = path.read_text().splitlines()
    for i in range(2):
        folder = out / "geneval" / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == json.loads(lines[i])
        for j in range(2):
            assert (folder / "samples" / f"{j:04d}.png").read_bytes() == (out / f"images/{i:06d}_{j:02d}.png").read_bytes()
    seeds = {r["seed"] for r in read_records(out / "samples.jsonl")}
    assert len(seeds) == 4
