"""A run dir is only ever a run dir (issue 20), through the real command line: decode refuses a folder of
the user's, the folder it runs from and the checkout; force=true moves only the contract's files, only
under every shard lock, and decodes the work list found after the move; a resume with another batch size
is refused; a deleted image is decoded again; Ctrl-C and a full disk end with one line. Every case checks
the exit status, the single line and the sha256 of every file that existed before."""
from __future__ import annotations

import resource
import signal
from pathlib import Path

import pytest

from tests.cli_helpers import (
    REPO,
    TINY,
    assert_kept,
    assert_one_line_error,
    snapshot,
    stage,
    start,
    wait_for_records,
)

DECODE = ("decode", *TINY, "prompts.limit=2")


def records(run_dir: Path) -> list[dict]:
    """Every record of the run dir (a torn last line, as a kill or a full disk leaves it, is none)."""
    from core.rundir import read_records, sample_files

    return [r for f in sample_files(run_dir) for r in read_records(f)]


def user_folder(root: Path) -> Path:
    mine = root / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "000000.png").write_bytes(b"my own picture")
    (mine / "notes.txt").write_text("my notes\n")
    return mine


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_of_the_users_is_refused_even_with_force(tmp_path, force):
    mine = user_folder(tmp_path)
    before = snapshot(tmp_path)
    proc = stage(*DECODE, f"out_dir={mine}", f"force={str(force).lower()}")
    assert_one_line_error(proc, "holds files of its own", "images", "notes.txt", "not a decode run dir")
    assert_kept(before, tmp_path)
    assert sorted(p.name for p in mine.rglob("*")) == ["000000.png", "images", "notes.txt"]  # nothing added


def test_the_folder_it_runs_from_and_any_folder_above_it_are_refused(tmp_path):
    project = tmp_path / "project"  # a user's checkout-like folder, the command run from inside it
    (project / "src").mkdir(parents=True)
    (project / "Makefile").write_text("all:\n")
    (project / "src" / "main.py").write_text("print('hi')\n")
    before = snapshot(tmp_path)
    for out_dir, needle in ((".", "is the folder this command runs from"), ("", "out_dir is empty"),
                            (str(tmp_path), "holds the folder this command runs from")):
        proc = stage(*DECODE, f"out_dir={out_dir}", "force=true", cwd=project)
        assert_one_line_error(proc, needle)
        assert_kept(before, tmp_path)
        assert not (project / "superseded").exists() and not (tmp_path / "superseded").exists()


def test_the_checkout_and_its_parents_are_never_a_run_dir():
    from core.errors import UserError
    from decode.ownership import check_out_dir

    for place in (REPO, REPO.parent, Path("/")):  # refused before anything is looked at or written
        with pytest.raises(UserError, match="the project's checkout|the folder this command runs from"):
            check_out_dir(place)


def test_a_train_run_dir_is_not_taken_over_by_force(tmp_path):
    train = tmp_path / "train_run"
    (train / "checkpoints").mkdir(parents=True)
    (train / "config.yaml").write_text("model: {name: tiny}\ntrain: {name: sjd2_tiny}\nrun_dir: x\n")
    (train / "checkpoints" / "latest").write_text("step_0000001")
    before = snapshot(tmp_path)
    assert_one_line_error(stage(*DECODE, f"out_dir={train}", "force=true"), "not a decode run dir")
    assert_kept(before, tmp_path)
    assert not (train / "superseded").exists()


def test_force_on_a_finished_run_of_another_configuration_moves_it_and_decodes_all(tmp_path):
    out = tmp_path / "run"
    assert stage(*DECODE, f"out_dir={out}").returncode == 0
    (out / "my_notes.txt").write_text("kept where it is\n")  # not the contract's: force leaves it alone
    before = snapshot(tmp_path)
    proc = stage(*DECODE, f"out_dir={out}", "decoder=sjd", "force=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not [x for x in proc.stderr.splitlines() if x.strip()]
    (old,) = (out / "superseded").iterdir()
    for name, digest in before.items():  # every earlier file is in superseded/<time>/, unchanged
        if name.startswith("run/") and not Path(name).name.startswith(".") and name != "run/my_notes.txt":
            assert snapshot(old)[name.removeprefix("run/")] == digest, name
    assert (out / "my_notes.txt").read_text() == "kept where it is\n"
    assert [r["decoder"] for r in records(out)] == ["sjd", "sjd"]  # the work list came after the move
    assert "name: sjd" in (out / "config.yaml").read_text()


def test_force_while_another_process_decodes_the_dir_moves_nothing(tmp_path):
    out = tmp_path / "run"
    slow = ("decode", *TINY, "prompts.limit=200", "prompts.images_per_prompt=10", f"out_dir={out}")
    busy = start(*slow)  # 2000 images: still decoding when the forced command comes
    try:
        wait_for_records(out / "samples.jsonl")
        proc = stage(*slow, "decoder=sjd", "force=true")
        assert busy.poll() is None, "the first process ended too early for this test"
        assert_one_line_error(proc, "another process is decoding into", "one writer per shard")
    finally:
        busy.send_signal(signal.SIGINT)
        assert busy.wait(timeout=120) == 130, busy.stderr.read()[-2000:]
    assert not (out / "superseded").exists() and "name: ar" in (out / "config.yaml").read_text()
    assert {r["decoder"] for r in records(out)} == {"ar"} and all((out / r["image"]).is_file() for r in records(out))


def test_a_resume_with_another_batch_size_is_refused_and_gets_its_own_default_dir(tmp_path):
    from core.config import compose_config

    out = tmp_path / "run"
    assert stage(*DECODE, f"out_dir={out}").returncode == 0
    before = snapshot(tmp_path)
    assert_one_line_error(stage(*DECODE, f"out_dir={out}", "batch_size=2", "prompts.limit=3"),
                          "another configuration", "batch_size: 1 -> 2")
    assert_kept(before, tmp_path)
    one, two = (compose_config([f"batch_size={b}"]).out_dir for b in (1, 2))
    assert two == one + "_b2" and not one.endswith("_b1")


def test_a_record_whose_image_was_deleted_is_decoded_again(tmp_path):
    out = tmp_path / "run"
    assert stage(*DECODE, f"out_dir={out}").returncode == 0
    first = {r["idx"]: r for r in records(out)}
    (out / "images" / "000001.png").unlink()
    before = snapshot(tmp_path)
    proc = stage(*DECODE, f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 finished image(s) had no file (images/000001.png)" in proc.stdout
    assert "1 decoded, 1 already there" in proc.stdout
    assert_kept({k: v for k, v in before.items() if not k.endswith(("samples.jsonl", "config.yaml", "env.json"))},
                tmp_path)  # the records are rewritten without the stale line; config and env written anew
    again = records(out)
    assert sorted(r["idx"] for r in again) == [0, 1]  # one record per image, the stale one gone
    assert {r["idx"]: r for r in again}[0] == first[0] and (out / "images" / "000001.png").is_file()
    assert {r["idx"]: r for r in again}[1]["tokens"] == first[1]["tokens"]  # same seed, same image


def test_ctrl_c_is_one_line_exit_130_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "run"
    args = ("decode", *TINY, "prompts.limit=12", f"out_dir={out}")
    proc = start(*args)
    wait_for_records(out / "samples.jsonl")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert [x for x in stderr.splitlines() if x.strip()] == ["interrupted; rerun the same command to resume"]
    done = records(out)
    assert 1 <= len(done) < 12 and all((out / r["image"]).is_file() for r in done)
    before = snapshot(tmp_path)
    again = stage(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_kept({k: v for k, v in before.items() if "/images/" in k}, tmp_path)
    assert sorted(r["idx"] for r in records(out)) == list(range(12))


def test_a_full_disk_is_one_line_naming_the_path_and_the_free_space(tmp_path):
    """The file-size limit makes the second record's append fail as a full disk does (EFBIG, partly written)."""
    ref = tmp_path / "reference"  # a whole run first: the sizes of its files set the limit
    assert stage("decode", "model=tiny", "prompts.limit=2", "warmup=false", "progress=false",
                 f"out_dir={ref}").returncode == 0
    line = len((ref / "samples.jsonl").read_text().splitlines()[0]) + 1
    limit = line + line // 2
    assert max(p.stat().st_size for p in ref.rglob("*") if p.is_file() and p.name != "samples.jsonl") < limit
    (tmp_path / "notes.txt").write_text("a file of the user's beside the run\n")
    before = snapshot(tmp_path)

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "run"
    args = ("decode", "model=tiny", "prompts.limit=2", "warmup=false", "progress=false", f"out_dir={out}")
    err = assert_one_line_error(stage(*args, preexec=small_disk), f"{out}/samples.jsonl", "free there",
                                "rerun the same command")
    assert "File too large" in err
    assert_kept(before, tmp_path)
    assert len(records(out)) == 1  # the finished image stays finished; the torn second line is not a record
    again = stage(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r["tokens"] for r in records(out)] == [r["tokens"] for r in records(ref)]
