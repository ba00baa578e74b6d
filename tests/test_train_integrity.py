"""The train stage never overwrites by surprise: exports go to <run_dir>/export unless a path is given,
and a resume with another model or schedule is refused before any file is written."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def base(run_dir: Path, *extra: str) -> list[str]:
    return ["model=tiny_random", "model.image_size=16", "train=sjd2_tiny", f"run_dir={run_dir}", "progress=false",
            "train.data.source=random", "train.data.n_examples=8", "train.max_steps=2", "train.micro_batch=2",
            "train.global_batch=4", "train.noise.levels=5", *extra]


def _digest(folder: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_the_recipe_exports_into_its_run_dir_not_over_committed_weights(tmp_path):
    from train.run import compose, run

    committed = REPO / "models" / "weights" / "tiny_sjd2"
    before = _digest(committed)
    assert compose(base(tmp_path / "run")).train.export_dir is None  # conf/train/sjd2_tiny.yaml says null
    res = run(compose(base(tmp_path / "run")))
    assert Path(res.export_dir) == tmp_path / "run" / "export" and (res.export_dir / "sjd2.json").is_file()
    assert _digest(committed) == before


@pytest.mark.parametrize("change, shown, allowed", [
    ("train.max_steps=3", "train.max_steps: 2 -> 3", True),
    ("train.optim.lr=0.001", "train.optim.lr", True),
    ("train.global_batch=2", "train.global_batch: 4 -> 2", False),  # the checkpoint itself cannot take it
    ("model.seed=5", "model.seed", True),
])
def test_a_resume_with_other_schedule_or_model_is_refused_before_writing(tmp_path, change, shown, allowed):
    from core.errors import UserError
    from train.run import compose, run

    run_dir = tmp_path / "run"
    run(compose(base(run_dir, "train.stop_after_steps=1")))  # a run that was stopped after step 1
    config_before = (run_dir / "config.yaml").read_text()
    with pytest.raises(UserError, match=rf"trained with other settings \(.*{shown}.*allow_resume_change=true"):
        run(compose(base(run_dir, change)))
    assert (run_dir / "config.yaml").read_text() == config_before
    if not allowed:
        with pytest.raises(ValueError, match="resume with the same setting"):
            run(compose(base(run_dir, change, "allow_resume_change=true")))
        return
    res = run(compose(base(run_dir, change, "allow_resume_change=true")))  # the explicit switch
    assert res.steps_done >= 2


def test_a_resume_may_change_logging_and_checkpoint_cadence(tmp_path):
    from train.run import compose, run

    run_dir = tmp_path / "run"
    run(compose(base(run_dir, "train.stop_after_steps=1")))
    res = run(compose(base(run_dir, "train.log_every=2", "train.ckpt_every=7")))
    assert res.steps_done == 2


def test_shapes_data_for_a_real_model_family_is_refused_before_loading_it(tmp_path):
    from core.errors import UserError
    from train.run import compose, run

    cfg = compose(["model=lumina_mgpt_tiny_random", "train=sjd2_tiny", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="source=shapes is the embedded shapes world.*train.data.source=shards"):
        run(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["foreign", "checkout", "cwd", "cwd_parent", "file"])
def test_training_refuses_a_run_dir_that_is_not_its_own_before_writing(tmp_path, monkeypatch, where):
    """A folder with a user's files, the checkout, a folder holding the working directory, or a file: refused
    with one line naming the problem, and nothing in it changes."""
    from core.errors import UserError
    from train.run import compose, run

    work, photos = tmp_path / "user" / "work", tmp_path / "user" / "photos"
    for folder in (work, photos):
        folder.mkdir(parents=True)
        (folder / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    target, match = {
        "foreign": (photos, "holds files of its own \\(notes.txt\\) and is not a training run dir"),
        "checkout": (REPO, "is the project's checkout"),
        "cwd": (work, "is the folder this command runs from"),
        "cwd_parent": (tmp_path / "user", "holds the folder this command runs from"),
        "file": (work / "notes.txt", "is a file, not a folder"),
    }[where]
    watched = REPO / "conf" if where == "checkout" else tmp_path
    before = _digest(watched)
    with pytest.raises(UserError, match=match):
        run(compose(base(target)))
    assert _digest(watched) == before and not (REPO / "config.yaml").exists()


def test_training_resumes_its_own_run_dir_and_takes_an_empty_one(tmp_path):
    from train.run import compose, run

    (tmp_path / "empty").mkdir()
    assert run(compose(base(tmp_path / "empty", "train.stop_after_steps=1"))).steps_done == 1
    assert run(compose(base(tmp_path / "empty"))).steps_done == 2  # its own earlier run: resumed
