"""The decode stage: run-dir contract, resume, torn lines, mixed configs, seeds, prompt sets, sharding.

Decodes run a micro tiny model (1 layer, 16x16 px = 4x4 codes) with a random patch VQ, through the
real ``decode.api.generate``; a few tests wrap it to count calls or to fail midway.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import compose_config
from core.rundir import image_seed, read_records
from data.prompts import PromptSetError, load_prompts
from decode.run import RunDirConflict, decode_run, resolve_shard, run_key

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"idx", "prompt", "category", "seed", "decoder", "n_tokens", "n_forwards", "latency_s", "peak_mem_bytes",
          "accepted_per_forward", "tokens"}


def make_micro_adapter():
    """A 1-layer tiny model over 4x4 codes with a seeded random patch VQ (decode_image works)."""
    from data.shapes import VOCAB
    from models.shapes_vq import PatchVQ
    from models.tiny import TinyConfig, build

    config = TinyConfig(words=tuple(VOCAB), n_codes=64, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    codebook = torch.randint(0, 256, (64, 4 * 4 * 3), generator=torch.Generator().manual_seed(0)).float()
    return build(config, seed=0, vq=PatchVQ(codebook, patch=4), image_size=16)


def decode_cfg(out_dir: Path, *overrides: str):
    """The real conf/decode.yaml, pointed at the micro model's shape and a temporary run dir."""
    base = ["model=tiny_random", "model.image_size=16", f"out_dir={out_dir}", "warmup=false", "progress=false",
            "prompts.limit=4"]
    return compose_config(base + list(overrides))


class Interrupted(Exception):
    pass


class CountingGenerate:
    """Wraps decode.api.generate: records each call's generator seed; raises after ``fail_after`` calls."""

    def __init__(self, fail_after: int | None = None):
        from decode.api import generate

        self.generate, self.fail_after, self.seeds = generate, fail_after, []

    def __call__(self, adapter, text, decoder_cfg, sampling, generator):
        if self.fail_after is not None and len(self.seeds) >= self.fail_after:
            raise Interrupted(f"killed after {self.fail_after} images")
        self.seeds.append(generator.initial_seed())
        return self.generate(adapter, text, decoder_cfg, sampling, generator)


@pytest.fixture(scope="module")
def adapter():
    return make_micro_adapter()


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS"):
        monkeypatch.delenv(var, raising=False)


def records_by_idx(run_dir: Path) -> dict[int, dict]:
    out = {}
    for f in sorted(run_dir.glob("samples*.jsonl")):
        for r in read_records(f):
            assert r["idx"] not in out, f"image {r['idx']} recorded twice"
            out[r["idx"]] = r
    return out


# ---------------------------------------------------------------------------------------------------
# Run-dir contract


def test_run_dir_holds_config_env_images_and_records(tmp_path, adapter):
    out = tmp_path / "run"
    summary = decode_run(decode_cfg(out, "decoder=sjd", "prompts.limit=3", "seed=7"), adapter=adapter)
    assert (summary.n_images, summary.n_decoded, summary.n_skipped) == (3, 3, 0)

    from omegaconf import OmegaConf

    saved = OmegaConf.load(out / "config.yaml")
    assert saved.decoder.name == "sjd" and saved.seed == 7 and saved.out_dir == str(out)
    assert "${" not in (out / "config.yaml").read_text(), "config.yaml must be resolved"
    env = json.loads((out / "env.json").read_text())
    assert {"git", "torch", "transformers", "device", "hostname"} <= set(env) and env["device"] == "cpu"

    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3
    prompts = load_prompts({"kind": "shapes", "name": "shapes", "limit": 3})
    for line, p in zip(lines, prompts):
        r = json.loads(line)
        assert FIELDS <= set(r)
        assert (r["idx"], r["prompt"], r["category"]) == (p.idx, p.prompt, p.category)
        assert r["seed"] == image_seed(7, p.idx) and r["decoder"] == "sjd" and r["peak_mem_bytes"] is None
        assert len(r["tokens"]) == adapter.layout.n_tokens == r["n_tokens"]
        assert adapter.layout.violations(torch.tensor(r["tokens"])) == []
        assert sum(r["accepted_per_forward"]) == r["n_tokens"] and len(r["accepted_per_forward"]) == r["n_forwards"]
        png = np.asarray(Image.open(out / f"images/{p.idx:06d}.png"))
        expected = np.asarray(adapter.decode_image(torch.tensor(r["tokens"])).convert("RGB"))
        assert png.shape == (16, 16, 3) and (png == expected).all(), "the PNG must be the decoded record tokens"
    assert not list(out.rglob(".*tmp*")), "no temporary files may remain"


def test_default_out_dir_separates_decoders_options_and_seeds():
    dirs = {
        compose_config(overrides).out_dir
        for overrides in (["decoder=ar"], ["decoder=sjd"], ["decoder=sjd", "decoder.window=8"],
                          ["decoder=sjd", "seed=1"], ["decoder=sjd", "sampling.temperature=0.5"])
    }
    assert len(dirs) == 5
    assert "w8" in compose_config(["decoder=sjd", "decoder.window=8"]).out_dir
    assert run_key({"name": "sjd", "window": 8}, {"cfg_scale": 3.0}) == run_key({"window": 8, "name": "sjd"},
                                                                                   {"cfg_scale": 3.0})


# ---------------------------------------------------------------------------------------------------
# Resume and crash safety


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, adapter):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    decode_run(decode_cfg(whole, "decoder=sjd", "prompts.limit=5"), adapter=adapter)

    first = CountingGenerate(fail_after=2)
    with pytest.raises(Interrupted):
        decode_run(decode_cfg(broken, "decoder=sjd", "prompts.limit=5"), adapter=adapter, generate_fn=first)
    assert sorted(records_by_idx(broken)) == [0, 1]

    second = CountingGenerate()
    summary = decode_run(decode_cfg(broken, "decoder=sjd", "prompts.limit=5"), adapter=adapter, generate_fn=second)
    assert summary.n_decoded == 3 and summary.n_skipped == 2
    assert second.seeds == [image_seed(0, i) for i in (2, 3, 4)], "finished images must not be decoded again"
    a, b = records_by_idx(whole), records_by_idx(broken)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3, 4]
    for i in a:
        assert a[i]["tokens"] == b[i]["tokens"] and a[i]["seed"] == b[i]["seed"]
        assert (whole / a[i]["image"]).read_bytes() == (broken / b[i]["image"]).read_bytes()

    third = CountingGenerate()
    assert decode_run(decode_cfg(broken, "decoder=sjd", "prompts.limit=5"), adapter=adapter,
                      generate_fn=third).n_decoded == 0
    assert third.seeds == []


def test_max_images_stops_early_and_limit_grows_a_run(tmp_path, adapter):
    out = tmp_path / "run"
    assert decode_run(decode_cfg(out, "max_images=1"), adapter=adapter).n_decoded == 1
    assert decode_run(decode_cfg(out, "prompts.limit=2"), adapter=adapter).n_decoded == 1
    assert sorted(records_by_idx(out)) == [0, 1]


def test_torn_last_line_is_ignored_then_cut_and_its_image_redone(tmp_path, adapter):
    out = tmp_path / "run"
    decode_run(decode_cfg(out, "prompts.limit=3"), adapter=adapter)
    path = out / "samples.jsonl"
    intact = path.read_bytes()
    last = json.loads(intact.splitlines()[-1])
    path.write_bytes(intact[:-25])  # killed in the middle of writing the third line
    assert [r["idx"] for r in read_records(path)] == [0, 1]

    counting = CountingGenerate()
    decode_run(decode_cfg(out, "prompts.limit=3"), adapter=adapter, generate_fn=counting)
    assert counting.seeds == [image_seed(0, 2)]
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x) for x in lines)
    assert json.loads(lines[-1])["tokens"] == last["tokens"]


def test_line_without_newline_counts_as_torn(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"idx": 0}\n{"idx": 1}')
    assert read_records(path) == [{"idx": 0}]
    read_records(path, repair=True)
    assert path.read_text() == '{"idx": 0}\n'


def test_corrupt_middle_line_raises(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"idx": 0}\n{"idx": \n{"idx": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_records(path)


def test_run_dir_of_another_config_is_refused_unless_forced(tmp_path, adapter):
    out = tmp_path / "run"
    decode_run(decode_cfg(out, "decoder=ar", "prompts.limit=1"), adapter=adapter)
    for overrides in (["decoder=sjd"], ["decoder=ar", "seed=1"], ["decoder=ar", "sampling.cfg_scale=1.0"],
                      ["decoder=ar", "model.dtype=bfloat16"]):
        with pytest.raises(RunDirConflict, match="force=true"):
            decode_run(decode_cfg(out, *overrides, "prompts.limit=1"), adapter=adapter)
    with pytest.raises(RunDirConflict, match=r"decoder\.name: 'ar' -> 'sjd'"):
        decode_run(decode_cfg(out, "decoder=sjd", "prompts.limit=1"), adapter=adapter)
    assert sorted(records_by_idx(out)) == [0]
    decode_run(decode_cfg(out, "decoder=sjd", "prompts.limit=2", "force=true"), adapter=adapter)
    assert {i: r["decoder"] for i, r in records_by_idx(out).items()} == {0: "sjd", 1: "sjd"}  # none relabelled
    (old,) = (out / "superseded").iterdir()
    assert [json.loads(line)["decoder"] for line in (old / "samples.jsonl").read_text().splitlines()] == ["ar"]


# ---------------------------------------------------------------------------------------------------
# Seeds


def test_ar_and_sjd_runs_see_the_same_per_image_seeds(tmp_path, adapter):
    ar, sjd = CountingGenerate(), CountingGenerate()
    decode_run(decode_cfg(tmp_path / "ar", "decoder=ar", "seed=3"), adapter=adapter, generate_fn=ar)
    decode_run(decode_cfg(tmp_path / "sjd", "decoder=sjd", "seed=3"), adapter=adapter, generate_fn=sjd)
    assert ar.seeds == sjd.seeds and len(set(ar.seeds)) == 4
    a, s = records_by_idx(tmp_path / "ar"), records_by_idx(tmp_path / "sjd")
    assert [a[i]["seed"] for i in sorted(a)] == [s[i]["seed"] for i in sorted(s)] == ar.seeds


def test_image_seeds_differ_by_seed_idx_and_sample():
    seeds = {image_seed(s, i, j) for s in range(3) for i in range(50) for j in range(2)}
    assert len(seeds) == 300 and all(0 <= x < 2**63 for x in seeds)


def test_warmup_decodes_once_untimed_and_unrecorded(tmp_path, adapter):
    counting = CountingGenerate()
    decode_run(decode_cfg(tmp_path / "run", "warmup=true", "prompts.limit=2"), adapter=adapter, generate_fn=counting)
    recorded = [r["seed"] for r in records_by_idx(tmp_path / "run").values()]
    assert len(counting.seeds) == 3 and counting.seeds[1:] == recorded and counting.seeds[0] not in recorded


# ---------------------------------------------------------------------------------------------------
# Prompt sets


def test_prompts_limit(tmp_path, adapter):
    decode_run(decode_cfg(tmp_path / "run", "prompts.limit=2"), adapter=adapter)
    assert sorted(records_by_idx(tmp_path / "run")) == [0, 1]
    assert len(load_prompts(compose_config(["prompts=shapes"]).prompts)) == 200


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    ('{"prompt": "a circle"}\n{"prompt": \n', r"bad\.jsonl:2 is not valid JSON"),
    ('{"text": "a circle"}\n', "missing or empty 'prompt'"),
    ("", "holds no prompts"),
])
def test_missing_or_malformed_prompt_file_fails_before_decoding(tmp_path, adapter, content, match):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "run"
    with pytest.raises(PromptSetError, match=match) as err:
        decode_run(decode_cfg(out, "prompts=file", f"prompts.path={path}"), adapter=adapter)
    assert str(path) in str(err.value) and "prompts.path" in str(err.value)
    assert not out.exists(), "nothing may be written before the prompts load"


def test_prompt_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  two squares  \n")
    (tmp_path / "p.json").write_text(json.dumps(["a circle", {"prompt": "a square", "category": "x"}]))
    txt = load_prompts({"kind": "file", "path": str(tmp_path / "p.txt")})
    js = load_prompts({"kind": "file", "path": str(tmp_path / "p.json")})
    assert [(p.idx, p.prompt) for p in txt] == [(0, "a red circle"), (1, "two squares")]
    assert [(p.prompt, p.category) for p in js] == [("a circle", None), ("a square", "x")]
    with pytest.raises(PromptSetError, match="no file given"):
        load_prompts(compose_config(["prompts=coco2017_5k"]).prompts)


# ---------------------------------------------------------------------------------------------------
# Sharding


def test_resolve_shard_reads_launcher_variables():
    assert resolve_shard(None, None, {}) == (0, 1)
    assert resolve_shard(None, None, {"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert resolve_shard(None, None, {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (1, 2)
    assert resolve_shard(0, 2, {"RANK": "1", "WORLD_SIZE": "4"}) == (0, 2)
    with pytest.raises(ValueError, match="shard.index"):
        resolve_shard(2, 2, {})


def test_shards_split_the_work_and_together_equal_one_process(tmp_path, adapter, monkeypatch):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    decode_run(decode_cfg(single, "decoder=sjd", "prompts.limit=5"), adapter=adapter)
    decode_run(decode_cfg(sharded, "decoder=sjd", "prompts.limit=5", "shard.index=0", "shard.count=2"),
               adapter=adapter)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    decode_run(decode_cfg(sharded, "decoder=sjd", "prompts.limit=5"), adapter=adapter)
    assert sorted(p.name for p in sharded.glob("samples*.jsonl")) == ["samples-0.jsonl", "samples-1.jsonl"]
    for rank in (0, 1):
        idx = [r["idx"] for r in read_records(sharded / f"samples-{rank}.jsonl")]
        assert idx and all(i % 2 == rank for i in idx)
    a, b = records_by_idx(single), records_by_idx(sharded)
    assert sorted(a) == sorted(b) == list(range(5))
    assert all(a[i]["tokens"] == b[i]["tokens"] for i in a)

    from eval.run import load_run

    merged = load_run(sharded)
    assert [r["idx"] for r in merged.records] == list(range(5))


# ---------------------------------------------------------------------------------------------------
# The Hydra entry point


def test_cli_multirun_gives_every_setting_its_own_run_dir(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    root = tmp_path / "runs"
    cmd = [sys.executable, "-m", "decode", "-m", "decoder=ar,sjd", "model=tiny_random", "prompts.limit=2",
           "max_images=0", f"out_dir={root}/${{decoder.name}}_s${{seed}}",
           f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in root.iterdir()) == ["ar_s0", "sjd_s0"]
    assert "name: sjd" in (root / "sjd_s0" / "config.yaml").read_text()
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_bad_sampling_or_decoder_option_fails_before_the_run_dir_exists(tmp_path, adapter):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="temperature"):
        decode_run(decode_cfg(out, "sampling.temperature=0"), adapter=adapter)
    with pytest.raises(ValueError, match="unknown option"):
        decode_run(decode_cfg(out, "decoder=sjd", "+decoder.windw=4"), adapter=adapter)
    assert not out.exists()
