"""Which folder decode may write, and how it takes one (the run-dir contract of :mod:`core.rundir`).

A run dir is only ever a run dir. decode writes into a folder that is missing, empty, or already a run
dir of this project (its ``config.yaml`` is a decode config); anything else is refused before anything is
written, and so is the folder the command runs from, the project's checkout, and any folder holding
either. ``force=true`` moves only :data:`core.rundir.CONTRACT_ENTRIES` to ``superseded/<UTC time>/``, and
only while it holds the run dir's lock and the lock of every shard (a process decoding into the dir now
makes it refuse, moving nothing). Taking a run dir, in order::

    run lock (waits) -> this shard's lock (fails at once if held) -> configuration checked, or moved aside
    with force -> config.yaml written -> torn last line cut -> records whose image is missing dropped
    -> run lock released; the shard lock is held until the images are decoded
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from core.errors import UserError
from core.rundir import (
    CONFIG_FILE,
    CONTRACT_ENTRIES,
    LOCK_ENTRIES,
    ShardBusy,
    atomic_write_bytes,
    check_own_folder,
    config_has_keys,
    held_lock,
    read_records,
    remove_stale_tmp,
    run_lock,
    sample_files,
    shard_lock,
    shard_lock_path,
    some_names,
)
from decode.identity import check_same_config, check_writable, config_diffs

RUN_DIR_KEYS = frozenset({"model", "decoder", "prompts", "seed"})  # a decode config.yaml has all of them


def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` holds a decode run's ``config.yaml`` (a mapping with :data:`RUN_DIR_KEYS`)."""
    return config_has_keys(folder, RUN_DIR_KEYS)


def _leftover(entry: Path) -> bool:
    """Entries an interrupted decode can leave before its config.yaml: locks, temporary files, empty images/."""
    name = entry.name
    if any(fnmatch.fnmatch(name, pat) for pat in LOCK_ENTRIES) or (name.startswith(".") and ".tmp-" in name):
        return True
    return name in ("images", "superseded") and entry.is_dir() and (name == "superseded" or not any(entry.iterdir()))


def check_out_dir(out_dir: Any) -> Path:
    """Refuse, before anything is written, an out_dir decode may not write into (see the module docstring)."""
    if out_dir is None or not str(out_dir).strip():
        raise UserError("out_dir is empty: name the run dir, e.g. out_dir=runs/mine (or leave out_dir out for "
                        "the default runs/<model>/<prompts>/<decoder key>_s<seed>)")
    run_dir = Path(str(out_dir)).expanduser()
    check_own_folder(run_dir, f"out_dir={out_dir}")
    if run_dir.is_dir() and not is_run_dir(run_dir):
        foreign = sorted(p.name for p in run_dir.iterdir() if not _leftover(p))
        if foreign:
            raise UserError(f"out_dir={out_dir} holds files of its own ({some_names(foreign)}) and is not a decode run dir (no "
                            f"decode {CONFIG_FILE}): decode writes only into a new or empty folder or a run dir; "
                            "pick another out_dir=... (force=true never takes over such a folder)")
    check_writable(run_dir)
    return run_dir


def contract_entries(run_dir: Path) -> list[Path]:
    """The run dir's entries that the contract names (what ``force=true`` moves), in name order."""
    return sorted(p for p in run_dir.iterdir() if any(fnmatch.fnmatch(p.name, pat) for pat in CONTRACT_ENTRIES))


def supersede(run_dir: Path, records_path: Path) -> Path | None:
    """Move the contract's entries into a new ``superseded/<UTC time>/``; the caller holds the run lock and
    this shard's lock, and every other shard's lock is taken here first (:class:`ShardBusy`: nothing moved)."""
    entries = contract_entries(run_dir)
    if not entries:
        return None
    mine = shard_lock_path(records_path)
    with contextlib.ExitStack() as locks:
        for lock in sorted(run_dir.glob(".samples*.jsonl.lock")):
            if lock != mine and not locks.enter_context(held_lock(lock, wait=False)):
                raise ShardBusy(f"another process is decoding into {run_dir} now ({lock.name[1:-5]}): force=true "
                                "moves nothing while it runs; wait for it to finish or stop it, then rerun")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest, n = run_dir / "superseded" / stamp, 1
        while dest.exists():  # two forced runs within one second: never mix their results
            n += 1
            dest = run_dir / "superseded" / f"{stamp}-{n}"
        dest.mkdir(parents=True)
        for entry in entries:
            os.replace(entry, dest / entry.name)
    return dest


def _rewrite_without(path: Path, drop: set[tuple[int, int]]) -> None:
    keep = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.endswith("\n") and line.strip() and _key(json.loads(line)) not in drop]
    atomic_write_bytes(path, "".join(keep).encode())


def _key(record: Mapping[str, Any]) -> tuple[int, int]:
    return int(record["idx"]), int(record.get("sample", 0))


def finished_with_images(run_dir: Path) -> set[tuple[int, int]]:
    """(idx, sample) of every image with a record and its file (what a resume will skip)."""
    return {_key(r) for f in sample_files(run_dir) for r in read_records(f) if (run_dir / r["image"]).is_file()}


def drop_records_without_images(run_dir: Path, records_path: Path, shard: tuple[int, int]) -> list[str]:
    """Records of this shard's images whose image file is gone are dropped, so the image is decoded again
    (never counted as done); returns the images. A file another running process writes is refused."""
    index, count = shard
    missing: dict[Path, set[tuple[int, int]]] = {}
    names = []
    for f in sample_files(run_dir):
        for r in read_records(f):
            if int(r["idx"]) % count == index and not (run_dir / r["image"]).is_file():
                missing.setdefault(f, set()).add(_key(r))
                names.append(str(r["image"]))
    for f, drop in missing.items():
        with (held_lock(shard_lock_path(f), wait=False) if f != records_path else contextlib.nullcontext(True)) as ok:
            if not ok:
                raise ShardBusy(f"{len(drop)} finished image(s) of {run_dir} are missing ({names[0]} ...) but their "
                                f"records are in {f.name}, which a running process writes now; rerun when it ends")
            _rewrite_without(f, drop)
    if names:
        print(f"{run_dir}: {len(names)} finished image(s) had no file ({some_names(names)}): decoding them again")
    return names


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, conf: Mapping[str, Any], force: bool, records_path: Path,
                  shard: tuple[int, int]) -> Iterator[list[str]]:
    """Take ``run_dir`` for this shard (the module docstring's order); yields the images to decode again.
    The shard's lock is held until the ``with`` block ends."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        with run_lock(run_dir):
            held.enter_context(shard_lock(records_path))  # one writer per shard: a second one fails here
            if config_diffs(run_dir, conf):
                if not force:
                    check_same_config(run_dir, conf)  # raises RunDirConflict
                moved = supersede(run_dir, records_path)
                print(f"force=true: the earlier results of {run_dir} moved to {moved}")
            (run_dir / "images").mkdir(exist_ok=True)
            remove_stale_tmp(run_dir)
            atomic_write_bytes(run_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(dict(conf))).encode())
            read_records(records_path, repair=True)
            repaired = drop_records_without_images(run_dir, records_path, shard)
        yield repaired

