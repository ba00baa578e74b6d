"""Run integrity from the command line: an expected error is one line naming the fix, exit status 2, no
traceback, and nothing written; a failed command does not block its own corrected rerun."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_decode_stage import adapter, decode_cfg, no_launcher_env, records_by_idx  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def stage(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SJD2_TRACEBACK")}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False, env={**base, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-1500:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


DECODE = ("decode", "model=tiny", "prompts.limit=1", "warmup=false", "progress=false")


@pytest.mark.parametrize("args, needles", [
    (["decoder=sjd", "decoder.window=0"], ["window"]),
    (["decoder=sjd2", "decoder.denoise_steps=0"], ["denoise_steps"]),
    (["prompts=file", "prompts.path=/nonexistent/prompts.txt"], ["/nonexistent/prompts.txt", "prompts.path"]),
    (["sampling.top_p=0"], ["top_p"]),
    (["prompts.limit=0"], ["prompts.limit"]),
    (["decoder=sjd2"], ["never fine-tuned for SJD2", "decoder.allow_untrained=true"]),  # tiny has no recipe
    (["sampling.top_k=-1"], ["top_k"]),
    (["sampling.temperature=0"], ["temperature"]),
    (["model.path=/nonexistent/weights"], ["/nonexistent/weights"]),
    (["model=tiny_sjd2", "decoder=sjd2", "decoder.schedule=cosine"], ["schedule", "check_trained_noise=false"]),
])
def test_bad_decode_input_is_one_line_and_writes_nothing(tmp_path, args, needles):
    out = tmp_path / "run"
    assert_one_line_error(stage(*DECODE, f"out_dir={out}", *args), *needles)
    assert not out.exists()


def test_a_broken_prompt_file_line_is_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a circle"}\n{"prompt": \n')
    out = tmp_path / "run"
    assert_one_line_error(stage(*DECODE, f"out_dir={out}", "prompts=file", f"prompts.path={bad}"),
                          f"{bad}:2 is not valid JSON")
    assert not out.exists()


def test_a_corrupt_records_line_is_one_line_and_the_file_is_left_alone(tmp_path):
    out = tmp_path / "run"
    assert stage(*DECODE, f"out_dir={out}", "prompts.limit=2").returncode == 0
    lines = (out / "samples.jsonl").read_text().splitlines()
    corrupt = lines[0][:40] + "\n" + lines[1] + "\n"  # a torn line in the middle is corruption, not a kill
    (out / "samples.jsonl").write_text(corrupt)
    assert_one_line_error(stage(*DECODE, f"out_dir={out}", "prompts.limit=3"), "samples.jsonl", "line 1")
    assert (out / "samples.jsonl").read_text() == corrupt


@pytest.mark.parametrize("args, needle", [
    (["model=nope"], "Could not find 'model/nope'"),
    (["decoder=nope"], "Could not find 'decoder/nope'"),
    (["decoder=sjd", "decoder.window=abc"], "decoder.window"),
])
def test_composition_errors_are_hydra_s_own_clear_messages_without_a_traceback(tmp_path, args, needle):
    out = tmp_path / "run"
    proc = stage(*DECODE, f"out_dir={out}", *args)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and needle in proc.stderr + proc.stdout
    assert not out.exists()


def test_a_failed_command_does_not_block_its_corrected_rerun(tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(stage(*DECODE, f"out_dir={out}", "decoder=sjd", "decoder.window=0"), "window")
    ok = stage(*DECODE, f"out_dir={out}", "decoder=sjd", "decoder.window=4")
    assert ok.returncode == 0, ok.stderr[-1500:]
    assert (out / "samples.jsonl").read_text().count("\n") == 1


def test_an_out_dir_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_one_line_error(stage(*DECODE, f"out_dir={blocker}/run"), "cannot be written", "out_dir=")


def test_a_run_dir_of_another_configuration_is_one_line_and_left_as_it_was(tmp_path):
    out = tmp_path / "run"
    assert stage(*DECODE, f"out_dir={out}").returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert_one_line_error(stage(*DECODE, f"out_dir={out}", "seed=7"), "another configuration", "seed: 0 -> 7")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_eval_of_a_partial_run_is_one_line_and_the_switch_shows_the_traceback(tmp_path):
    out = tmp_path / "run"
    assert stage(*DECODE, f"out_dir={out}").returncode == 0
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace("limit: 1", "limit: 2"))
    assert_one_line_error(stage("eval", f"run_dir={out}"), "holds 1 of 2 images", "allow_partial=true")
    loud = stage("eval", f"run_dir={out}", env={"SJD2_TRACEBACK": "1"})
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "PartialRun" in loud.stderr


# ---------------------------------------------------------------------------------------------------
# A run dir is keyed to its content (in-process, on the micro model of test_decode_stage)


def test_an_edited_prompt_file_is_refused_not_reused(tmp_path, adapter):  # noqa: F811
    from decode.run import RunDirConflict, decode_run

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo squares\n")
    out = tmp_path / "run"
    args = ["prompts=file", f"prompts.path={prompts}", "prompts.limit=null"]
    decode_run(decode_cfg(out, *args), adapter=adapter)
    prompts.write_text("a red circle\nthree squares\n")  # edited in place, same path
    with pytest.raises(RunDirConflict, match=r"fingerprint\.prompts.*prompt file's content changed"):
        decode_run(decode_cfg(out, *args), adapter=adapter)
    assert [r["prompt"] for r in records_by_idx(out).values()] == ["a red circle", "two squares"]


def test_retrained_weights_are_refused_and_force_supersedes_without_relabelling(tmp_path, adapter):  # noqa: F811
    from decode.run import RunDirConflict, decode_run

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"first training")
    out = tmp_path / "run"
    decode_run(decode_cfg(out, f"model.path={weights}", "prompts.limit=1"), adapter=adapter)
    first = records_by_idx(out)[0]
    (weights / "model.safetensors").write_bytes(b"retrained!!!!!")  # same size, other content
    with pytest.raises(RunDirConflict, match=r"weights changed.*force=true"):
        decode_run(decode_cfg(out, f"model.path={weights}", "prompts.limit=1"), adapter=adapter)
    decode_run(decode_cfg(out, f"model.path={weights}", "prompts.limit=1", "force=true"), adapter=adapter)
    (old,) = (out / "superseded").iterdir()
    assert (old / first["image"]).is_file() and (old / "config.yaml").is_file()
    assert "first training" not in (out / "config.yaml").read_text()
    assert read_fingerprint(old) != read_fingerprint(out)


def read_fingerprint(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["fingerprint"]


def test_stale_temporary_files_of_dead_processes_are_removed_on_resume(tmp_path, adapter):  # noqa: F811
    from decode.run import decode_run

    out = tmp_path / "run"
    decode_run(decode_cfg(out, "prompts.limit=1"), adapter=adapter)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    stale = [out / f".samples.jsonl.tmp-{dead}", out / "images" / f".000001.png.tmp-{dead}"]
    live = out / f".config.yaml.tmp-{os.getppid()}"  # a running process's file stays
    for f in [*stale, live]:
        f.write_bytes(b"partial")
    decode_run(decode_cfg(out, "prompts.limit=2"), adapter=adapter)
    assert not any(f.exists() for f in stale) and live.exists()


def test_one_writer_per_shard(tmp_path, adapter):  # noqa: F811
    from core.rundir import ShardBusy, shard_lock
    from decode.run import decode_run

    out = tmp_path / "run"
    decode_run(decode_cfg(out, "prompts.limit=1"), adapter=adapter)
    # another process decoding this shard now
    with shard_lock(out / "samples.jsonl"), pytest.raises(ShardBusy, match="one writer per shard"):
        decode_run(decode_cfg(out, "prompts.limit=2"), adapter=adapter)
    assert len(records_by_idx(out)) == 1
    decode_run(decode_cfg(out, "prompts.limit=2"), adapter=adapter)  # the lock went with its holder
    assert sorted(records_by_idx(out)) == [0, 1]


def test_silent_wrong_inputs_are_refused(tmp_path):
    from data.prompts import PromptSetError, load_prompts
    from decode.sampling import SamplingConfig

    with pytest.raises(ValueError, match="cfg_scale must be a finite number >= 0"):
        SamplingConfig(cfg_scale=-1.0)
    path = tmp_path / "p.json"
    path.write_text('["a circle", "  "]')
    with pytest.raises(PromptSetError, match=r"prompt 1\): an empty prompt string"):
        load_prompts({"kind": "file", "path": str(path)})


def test_sjd2_on_a_model_never_fine_tuned_for_it_needs_the_explicit_option(tmp_path, adapter):  # noqa: F811
    from core.errors import UserError
    from decode.run import decode_run

    out = tmp_path / "run"
    assert adapter.trained_recipe() is None
    with pytest.raises(UserError, match="never fine-tuned"):
        decode_run(decode_cfg(out, "decoder=sjd2", "decoder.window=4", "decoder.denoise_steps=4",
                              "prompts.limit=1"), adapter=adapter)
    assert not out.exists()
    decode_run(decode_cfg(out, "decoder=sjd2", "decoder.window=4", "decoder.denoise_steps=4", "prompts.limit=1",
                          "decoder.allow_untrained=true"), adapter=adapter)
    assert len(records_by_idx(out)) == 1


def test_a_prompt_longer_than_the_model_context_is_refused_before_writing(tmp_path, adapter):  # noqa: F811
    from core.errors import UserError
    from decode.run import decode_run

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n" + " ".join(["circle"] * 10_000) + "\n")
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"prompt idx 1 is 10001 tokens.*more than model=tiny_random has \(128\)"):
        decode_run(decode_cfg(out, "prompts=file", f"prompts.path={prompts}", "prompts.limit=null"), adapter=adapter)
    assert not out.exists()


def test_a_prompt_the_model_cannot_tokenize_is_refused_before_writing(tmp_path, adapter):  # noqa: F811
    from decode.run import decode_run

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na photo of a bench\n")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="'photo' of prompt 'a photo of a bench' is outside the tiny model's"):
        decode_run(decode_cfg(out, "prompts=file", f"prompts.path={prompts}", "prompts.limit=null"), adapter=adapter)
    assert not out.exists()


def test_weights_under_a_hidden_folder_are_fingerprinted(tmp_path):
    from decode.identity import weights_fingerprint

    weights = tmp_path / ".cache" / "hub" / "model"  # e.g. a model in ~/.cache/huggingface
    weights.mkdir(parents=True)
    (weights / "model.safetensors").write_bytes(b"first")
    (weights / ".lock").write_bytes(b"x")
    first = weights_fingerprint({"path": str(weights)})
    (weights / ".lock").write_bytes(b"y")  # hidden files inside the folder do not count
    assert weights_fingerprint({"path": str(weights)}) == first
    (weights / "model.safetensors").write_bytes(b"other")
    assert weights_fingerprint({"path": str(weights)}) != first
