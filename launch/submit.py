"""Run a stage under one of the launchers that ``conf/launcher/*.yaml`` describe.

    python -m launch LAUNCHER STAGE [launcher.FIELD=VALUE ...] [hydra overrides ...] [--dry-run]
    python -m launch torchrun decode model=lumina_mgpt_768 decoder=sjd2_lumina_mgpt prompts=coco2017_5k
    python -m launch slurm train model=emu3_720 launcher.nnodes=2 launcher.partition=gpu --dry-run

The YAML holds the launcher's defaults (processes per node, nodes, SLURM resources); ``launcher.FIELD=VALUE``
overrides one of them for this call and every other argument goes to the stage unchanged. Every stage
shards by itself (RANK / WORLD_SIZE, SLURM_PROCID / SLURM_NTASKS), so the launchers only start processes:

* ``local``: one process, ``python -m STAGE ...``.
* ``torchrun``: ``torchrun --nnodes N --nproc_per_node G`` with the YAML's rendezvous.
* ``slurm``: ``sbatch``. ``train`` goes through ``launch/slurm_multinode.sbatch`` (one task per node, each
  a torchrun over its GPUs: DeepSpeed ZeRO-3); ``decode`` / ``eval`` run one task per GPU under ``srun``.

``--dry-run`` prints the command instead of running it.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_DIR = REPO_ROOT / "conf" / "launcher"
STAGES = ("decode", "eval", "train")
PREFIX = "launcher."


def launchers() -> list[str]:
    return sorted(p.stem for p in LAUNCHER_DIR.glob("*.yaml"))


def load_launcher(name: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The launcher's YAML with ``FIELD=VALUE`` overrides applied; unknown names and fields are refused."""
    path = LAUNCHER_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown launcher {name!r} (pick one of {launchers()}: conf/launcher/*.yaml)")
    conf = OmegaConf.load(path)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or key not in conf:
            raise ValueError(f"launcher.{key}: not a field of conf/launcher/{name}.yaml "
                             f"(fields: {sorted(k for k in conf if k != 'name')})")
    conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(list(overrides)))
    cfg = OmegaConf.to_container(conf, resolve=True)
    for key in ("nnodes", "nproc_per_node", "ntasks_per_node", "gpus_per_node", "cpus_per_task"):
        if key in cfg and (isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1):
            raise ValueError(f"launcher.{key} must be an integer >= 1, got {cfg[key]!r}")
    return cfg


def command(launcher: Mapping[str, Any], stage: str, args: Sequence[str], python: str) -> list[str]:
    """The command line that starts ``stage`` with ``args`` under ``launcher``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (pick one of {list(STAGES)})")
    name = launcher["name"]
    if name == "local":
        return [python, "-m", stage, *args]
    if name == "torchrun":
        return [python, "-m", "torch.distributed.run", "--nnodes", str(launcher["nnodes"]),
                "--nproc_per_node", str(launcher["nproc_per_node"]), "--rdzv_backend",
                str(launcher["rdzv_backend"]), "--rdzv_endpoint", str(launcher["rdzv_endpoint"]),
                "-m", stage, *args]
    if name == "slurm":
        sbatch = ["sbatch", f"--nodes={launcher['nnodes']}", f"--gpus-per-node={launcher['gpus_per_node']}",
                  f"--cpus-per-task={launcher['cpus_per_task']}", f"--time={launcher['time']}"]
        sbatch += [f"--{k}={launcher[k]}" for k in ("partition", "account") if launcher.get(k)]
        if stage == "train":
            model = [a.partition("=")[2] for a in args if a.startswith("model=")]
            if not model:
                raise ValueError("the slurm train launcher needs model=<conf/model name> "
                                 "(launch/slurm_multinode.sbatch takes the model first)")
            rest = [a for a in args if not a.startswith("model=")]
            return [*sbatch, "--ntasks-per-node=1", f"--export=ALL,GPUS_PER_NODE={launcher['gpus_per_node']}",
                    str(REPO_ROOT / "launch" / "slurm_multinode.sbatch"), model[-1], *rest]
        srun = shlex.join(["srun", python, "-m", stage, *args])
        return [*sbatch, f"--ntasks-per-node={launcher['ntasks_per_node']}", f"--wrap={srun}"]
    raise ValueError(f"conf/launcher/{name}.yaml: no command for launcher name {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    name, stage, rest = argv[0], argv[1], argv[2:]
    try:
        launcher = load_launcher(name, [a[len(PREFIX):] for a in rest if a.startswith(PREFIX)])
        cmd = command(launcher, stage, [a for a in rest if not a.startswith(PREFIX)],
                      os.environ.get("PY", sys.executable))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dry:
        print(shlex.join(cmd))
        return 0
    os.chdir(REPO_ROOT)
    os.execvp(cmd[0], cmd)
    return 0  # not reached
