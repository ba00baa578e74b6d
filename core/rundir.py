"""The run-directory contract: the files every stage writes and reads, on the ground floor.

decode writes a run dir, eval reads it, bench and train reuse its helpers; none of them imports another
stage for it, so this module imports only the standard library and torch (yaml lazily, to read a config.yaml;
STYLE.md example 7)::

    config.yaml              the resolved config of the run
    env.json                 git hash, versions, device, hostname (sharded runs: env-{rank}.json)
    images/{idx:06d}.png     one per prompt ({idx:06d}_{sample:02d}.png when images_per_prompt > 1)
    samples.jsonl            one JSON object per finished image (sharded runs: samples-{rank}.jsonl)
    geneval/{idx:05d}/       with prompts.geneval_folder: metadata.jsonl + samples/{sample:04d}.png
    scores.json, per_image_*.jsonl, scores.{md,csv,tex}, scores_*.png, wandb/    written by eval
    .run.lock, .samples*.jsonl.lock    the kernel locks (empty files) of the dir and of each shard
    superseded/<UTC time>/   earlier results of another configuration, moved there by force=true

Ownership: decode writes only into a folder that is missing, empty, or already a run dir (its config.yaml
is a decode config); ``force=true`` moves only the entries of :data:`CONTRACT_ENTRIES` aside, never any
other file (decode/ownership.py).

Crash safety: an image is *finished* once its record line is in a ``samples*.jsonl``. The PNG is
written first (tmp file + ``os.replace``), then the line (one write, flush, fsync). On restart a torn
last line is cut off and every image without a record is decoded again, so a killed run loses at most
the image in flight. The seed of an image depends only on (seed, idx, sample): never on the order,
the sharding or the decoder, so AR and SJD runs of one seed see the same per-image generators.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
CONFIG_FILE = "config.yaml"
RUN_LOCK = ".run.lock"
# what force=true moves to superseded/ (glob patterns at the top of a run dir); the lock files stay, so a
# process that opens a lock later still meets the one its peers hold
CONTRACT_ENTRIES = (CONFIG_FILE, "env.json", "env-*.json", "samples.jsonl", "samples-*.jsonl", "images", "geneval",
                    "scores.*", "scores_*", "per_image_*.jsonl", "wandb")
LOCK_ENTRIES = (RUN_LOCK, ".samples*.jsonl.lock")


# ---------------------------------------------------------------------------------------------------
# Seeds and names


def image_seed(seed: int, idx: int, sample: int = 0) -> int:
    """Seed of one image from (run seed, prompt index, sample number): a hash, independent of order."""
    digest = hashlib.sha256(f"sjd2-image/{int(seed)}/{int(idx)}/{int(sample)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def samples_name(index: int, count: int) -> str:
    """``samples.jsonl`` for a single process, ``samples-{rank}.jsonl`` for a shard."""
    return "samples.jsonl" if count == 1 else f"samples-{index}.jsonl"


def image_name(idx: int, sample: int, images_per_prompt: int) -> str:
    """Path of an image relative to the run dir."""
    return f"images/{idx:06d}.png" if images_per_prompt == 1 else f"images/{idx:06d}_{sample:02d}.png"


# ---------------------------------------------------------------------------------------------------
# Files: atomic writes, durable appends, torn-line repair


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """An ``OSError`` without a file name (``write`` on a full disk) gets ``path`` as its file name, so the
    one-line error (core/errors.py) can say where it happened and how much space is left there."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with naming(path):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk keeps no half-written temporary file
            raise
        os.replace(tmp, path)


def check_own_folder(run_dir: Path, shown: str) -> None:
    """Refuse (one line) a run dir, spelled ``shown`` (e.g. ``out_dir=runs/x``), that is, or holds, the folder
    the command runs from or the project's checkout, or that is a file. Every stage that writes a run dir
    calls this before it writes anything (decode/ownership.py, train/run.py)."""
    resolved = run_dir.resolve()
    key = shown.split("=", 1)[0]
    for what, place in (("the folder this command runs from", Path.cwd().resolve()),
                        ("the project's checkout", REPO_ROOT.resolve())):
        if resolved == place or resolved in place.parents:
            raise UserError(f"{shown} {'is' if resolved == place else 'holds'} {what}: a run dir is a folder of its "
                            f"own; pick a new one, e.g. {key}=runs/mine")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{shown} is a file, not a folder; pick another {key}=...")


def config_has_keys(folder: Path, keys: frozenset[str]) -> bool:
    """Whether ``folder`` holds a ``config.yaml`` that is a mapping with every one of ``keys`` (a stage's own
    run dir); a missing, unreadable or non-YAML file is not one."""
    import yaml

    try:
        config = yaml.safe_load((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and keys <= set(config)


def some_names(names: Sequence[str], shown: int = 3) -> str:
    """``a, b, c and 4 more``: the first ``shown`` of ``names``, in their order, for a one-line message."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def remove_stale_tmp(run_dir: Path) -> list[Path]:
    """Delete the ``.*.tmp-PID`` files a killed process left in ``run_dir`` (and one level below); files of
    a process that still runs (another shard writing now) are kept. Returns the removed paths."""
    removed = []
    for tmp in [*Path(run_dir).glob(".*.tmp-*"), *Path(run_dir).glob("*/.*.tmp-*")]:
        pid = tmp.name.rsplit("tmp-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save_image(image: Any, path: Path) -> None:
    """Save a PIL image as PNG atomically."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line durably (a single write, then flush + fsync)."""
    line = json.dumps(record, separators=(",", ":")) + "\n"
    with naming(path), open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


class ShardBusy(UserError):
    """Another process is writing this shard's records now."""


@contextlib.contextmanager
def shard_lock(records_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``records_path`` (a ``.<name>.lock`` beside it) for one writer per shard.

    A second process for the same shard fails at once with :class:`ShardBusy` (the lock is the kernel's:
    it goes with the process, so a killed run leaves no stale lock).
    """
    with held_lock(shard_lock_path(records_path), wait=False) as ok:
        if not ok:
            raise ShardBusy(f"another process is decoding into {records_path} now (one writer per shard): "
                            "wait for it, or give this one another shard.index / out_dir")
        yield


def shard_lock_path(records_path: Path) -> Path:
    """The lock file of a records file: ``.<name>.lock`` beside it."""
    return records_path.with_name(f".{records_path.name}.lock")


@contextlib.contextmanager
def held_lock(lock: Path, wait: bool) -> Iterator[bool]:
    """An exclusive kernel lock on the file ``lock`` (created if missing): yields True once held, False when
    another process holds it and ``wait`` is False. Released on exit, or when the process dies."""
    import fcntl

    with open(lock, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run dir's own lock (``.run.lock``) while its configuration is checked, moved aside or written:
    a few seconds at most, so a second process waits for it instead of failing."""
    with held_lock(Path(run_dir) / RUN_LOCK, wait=True):
        yield


def read_records(path: Path, repair: bool = False) -> list[dict]:
    """Records of one ``samples*.jsonl``; a torn last line (killed mid-write) is skipped.

    With ``repair`` the torn tail is also cut from the file, so the next append starts a clean line.
    A malformed line anywhere else is corruption, not a crash: that raises.
    """
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records, good_end, offset = [], 0, 0
    for i, line in enumerate(lines):
        end = offset + len(line) + 1
        is_last = i >= len(lines) - 2  # the final line, or the text after the final newline
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if not is_last:
                    raise ValueError(
                        f"{path}: line {i + 1} is not valid JSON and is not the last line; the file is "
                        "corrupt: remove that line (its image will be decoded again)"
                    ) from None
                break
        if i < len(lines) - 1:  # a complete (newline-terminated) line
            good_end = end
        elif line.strip():  # parsed but lacks its newline: an append cut short, treat it as torn
            records.pop()
        offset = end
    if repair and good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return records


def sample_files(run_dir: Path) -> list[Path]:
    """Every records file of a run dir (one per shard)."""
    return sorted(Path(run_dir).glob("samples*.jsonl"))


def finished(run_dir: Path) -> set[tuple[int, int]]:
    """(idx, sample) of every image with a record in any shard's file."""
    return {(int(r["idx"]), int(r.get("sample", 0))) for f in sample_files(run_dir) for r in read_records(f)}


# ---------------------------------------------------------------------------------------------------
# Environment and timing


def git_hash() -> str | None:
    """HEAD commit of the repository (``+dirty`` with uncommitted changes); None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, check=False,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device | str | None, **extra: Any) -> dict[str, Any]:
    """What produced the numbers: code version, library versions, device, host; ``extra`` adds a stage's own
    fields (train: ``world_size``, ``deepspeed``) after the common ones."""
    import transformers

    dev = torch.device(device) if device is not None else torch.device("cpu")
    return {
        "git": git_hash(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
        "hostname": socket.gethostname(),
        "torch_threads": torch.get_num_threads(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host timer measures it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
