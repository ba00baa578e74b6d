"""Sharding under the launchers a cluster user has: each task of a job decodes its own share, once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from decode.run import resolve_shard

REPO = Path(__file__).resolve().parents[1]


def test_resolve_shard_reads_submitit_local_variables():
    env = {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_LOCALID": "1"}
    assert resolve_shard(None, None, env) == (1, 2)
    # torchrun inside a submitit task: torchrun's own variables describe the process
    assert resolve_shard(None, None, {**env, "RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)


def test_submitit_local_tasks_split_the_prompts(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "decode", "-m", "hydra/launcher=submitit_local",
           "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={tmp_path / 'sweep'}", "model=tiny", "decoder=ar",
           "prompts.limit=4", f"out_dir={run}", "warmup=false", "progress=false"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    shards = {}
    for f in sorted(run.glob("samples*.jsonl")):
        shards[f.name] = [json.loads(line) for line in f.read_text().splitlines()]
    assert sorted(shards) == ["samples-0.jsonl", "samples-1.jsonl"]
    idx = sorted(r["idx"] for rows in shards.values() for r in rows)
    assert idx == [0, 1, 2, 3]  # every image once, none twice
    for name, rows in shards.items():
        assert {r["idx"] % 2 for r in rows} == {int(name[8])}
