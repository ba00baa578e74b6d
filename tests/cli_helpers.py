"""Running the real command lines in tests: this checkout's code (PYTHONPATH from this file's place), one
`error:` line checks, and sha256 snapshots of every file that existed before a command."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the small decode every CLI test starts from: a random tiny model at 16 px (25 tokens an image)
TINY = ("model=tiny_random", "model.image_size=16", "warmup=false", "progress=false")


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SJD2_TRACEBACK")}
    return {**base, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **extra}


def _default_sigint() -> None:  # a background shell starts children with SIGINT ignored; Ctrl-C tests need it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stage(*args: str, cwd: Path = REPO, timeout: float = 300, preexec=None) -> subprocess.CompletedProcess:
    """``python -m <args>`` of this checkout, run from ``cwd``."""
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout, check=False, preexec_fn=preexec)


def start(*args: str, cwd: Path = REPO) -> subprocess.Popen:
    """``python -m <args>`` in the background (SIGINT at its default, as from a terminal)."""
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)  # noqa: PLW1509 (no threads here)


def wait_for_records(records: Path, n: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if records.is_file() and records.read_text().count("\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{records} never held {n} record(s)")


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def assert_kept(before: dict[str, str], root: Path) -> None:
    """Every file of ``before`` is still there with the same content."""
    after = snapshot(root)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"pre-existing files changed or gone: {changed[:10]}"


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, status: int = 2) -> str:
    """Exit ``status``, stderr is exactly one ``error:`` line (no traceback, no Hydra dump) holding ``needles``."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == status, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
