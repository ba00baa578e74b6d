"""conf/launcher/*.yaml drive real command lines (python -m launch ... --dry-run)."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch.submit import command, launchers, load_launcher

REPO = Path(__file__).resolve().parents[1]


def dry(*args):
    return subprocess.run([sys.executable, "-m", "launch", *args, "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)


def test_every_launcher_yaml_has_a_command():
    assert launchers() == ["local", "slurm", "torchrun"]
    for name in launchers():
        cmd = command(load_launcher(name), "decode", ["model=tiny"], "py")
        assert "model=tiny" in " ".join(cmd)


def test_torchrun_takes_its_sizes_from_the_yaml_and_overrides():
    res = dry("torchrun", "decode", "model=tiny", "launcher.nproc_per_node=4", "seed=3")
    assert res.returncode == 0, res.stderr
    cmd = shlex.split(res.stdout)
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4"
    assert cmd[cmd.index("--rdzv_endpoint") + 1] == "localhost:29500"
    assert cmd[-4:] == ["-m", "decode", "model=tiny", "seed=3"]  # launcher.* never reaches the stage


def test_slurm_decode_runs_one_srun_task_per_gpu():
    cmd = command(load_launcher("slurm", ["partition=gpu", "nnodes=2"]), "decode", ["model=tiny"], "py")
    assert "--partition=gpu" in cmd and "--nodes=2" in cmd and "--ntasks-per-node=8" in cmd
    assert cmd[-1] == "--wrap=srun py -m decode model=tiny"
    assert not any(c.startswith("--account") for c in cmd)  # null fields are left out


def test_slurm_train_goes_through_the_multinode_script():
    cmd = command(load_launcher("slurm"), "train", ["model=emu3_720", "train.micro_batch=4"], "py")
    assert cmd[-2:] == ["emu3_720", "train.micro_batch=4"]
    assert cmd[-3].endswith("launch/slurm_multinode.sbatch")
    assert "--ntasks-per-node=1" in cmd and "--export=ALL,GPUS_PER_NODE=8" in cmd


@pytest.mark.parametrize("args, message", [
    (["nowhere", "decode"], "unknown launcher"),
    (["local", "paint"], "unknown stage"),
    (["torchrun", "decode", "launcher.gpus=2"], "launcher.gpus: not a field"),
    (["torchrun", "decode", "launcher.nproc_per_node=0"], "launcher.nproc_per_node must be"),
    (["slurm", "train", "train.max_steps=3"], "needs model="),
])
def test_bad_launcher_arguments_are_one_line_errors(args, message):
    res = dry(*args)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and message in res.stderr and res.stderr.count("\n") == 1
