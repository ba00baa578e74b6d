"""DeepSpeed ZeRO-3 with 2 CPU processes (torchrun, gloo) through launch/finetune.sh: the same loss curve as
one plain process, exact resume after a kill, consolidated weights that load into the single-process model.

The launches are slow (three of ~15 s each on 2 cores; the very first DeepSpeed launch on a machine also compiles
its shared-memory comm op, ~2 minutes, cached afterwards): run by ``make test-full``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.loop import LossLog

REPO = Path(__file__).resolve().parents[1]

# micro_batch 1 x 2 processes x accumulation 2 = global batch 4; chunked head loss + activation
# checkpointing: the code path of the real-model recipes.
OVERRIDES = [
    "model.image_size=16", "train.data.source=random", "train.data.n_examples=12", "train.max_steps=4",
    "train.micro_batch=1", "train.global_batch=4", "train.optim.lr=3e-3", "train.optim.warmup_steps=1",
    "train.noise.levels=5", "train.layout.span_max=8", "train.objective.loss_chunk_tokens=24",
    "train.grad_checkpointing=true", "train.ckpt_every=0", "progress=false",
]


def launch(run_dir: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    args = ["bash", "launch/finetune.sh", "tiny_random", str(nproc), *OVERRIDES, f"run_dir={run_dir}",
            f"train.export_dir={run_dir / 'export'}", *extra]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)


def losses(run_dir: Path) -> list[float]:
    return [float(r["loss"]) for r in LossLog.read(run_dir / "loss.csv")]


@pytest.mark.slow
def test_zero3_on_two_cpu_processes_matches_one_process_resumes_exactly_and_exports(tmp_path):
    from safetensors.torch import load_file

    from models import load_adapter
    from models.tiny import load
    from train.run import compose, run

    plain = run(compose(["model=tiny_random", *OVERRIDES, f"run_dir={tmp_path / 'plain'}",
                         f"train.export_dir={tmp_path / 'plain' / 'export'}"]))
    assert plain.steps_done == 4

    killed = launch(tmp_path / "ds", "train.stop_after_steps=2")
    assert killed.returncode == 0, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert len(losses(tmp_path / "ds")) == 2 and not (tmp_path / "ds" / "export").exists()
    resumed = launch(tmp_path / "ds")  # the same command again: continues from checkpoints/latest
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "DeepSpeed" in resumed.stdout + resumed.stderr  # it really ran the ZeRO-3 engine

    ds_curve = losses(tmp_path / "ds")
    assert len(ds_curve) == 4
    assert ds_curve == pytest.approx(plain.losses, rel=1e-4), (ds_curve, plain.losses)
    assert ds_curve[-1] < ds_curve[0]

    # the consolidated ZeRO-3 weights load into the single-process model and equal the plain run's up to
    # reduction-order rounding (which Adam amplifies on rarely used embedding rows: compare tensor norms)
    loaded = load(tmp_path / "ds" / "export", image_size=16)
    ref = load_file(str(tmp_path / "plain" / "export" / "model.safetensors"))
    start = load_file(str(tmp_path / "ds" / "export" / "model.safetensors"))
    assert set(ref) == set(loaded.model.state_dict())
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, start[name])
        rel = float((value - ref[name]).norm() / ref[name].norm())
        assert rel < 1e-3, (name, rel)
    base = load_adapter(compose(["model=tiny_random", "model.image_size=16"]).model).model.state_dict()
    assert max(float((base[k] - ref[k]).abs().max()) for k in ref) > 1e-3  # training moved the weights
    assert loaded.config.extra["sjd2"]["noise"]["levels"] == 5


@pytest.mark.slow
def test_an_impossible_batch_for_the_world_size_stops_with_the_fix(tmp_path):
    res = launch(tmp_path / "bad", "train.global_batch=3", "train.data.n_examples=12")
    assert res.returncode != 0
    assert "not divisible" in res.stdout + res.stderr


@pytest.mark.parametrize("args, message", [
    ([], "usage"), (["no_such_model", "2"], "unknown MODEL"), (["tiny", "two"], "NPROC must be"),
])
def test_the_launcher_refuses_bad_arguments_before_starting(args, message):
    res = subprocess.run(["bash", "launch/finetune.sh", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 2 and message in res.stderr
