"""What a decode run dir means: its configuration identity, the fingerprints of its prompt set's content
and of its weights, and the checks made before anything is written (a run dir holds the images of exactly
one configuration; ``force=true`` moves earlier results aside, never relabels them: decode/ownership.py)."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from core.config import flatten
from core.errors import UserError
from core.rundir import CONFIG_FILE
from data.prompts import Prompt

# Parts of the config that must match before a run dir may be resumed (prompts.limit and
# prompts.geneval_folder may change: they select or lay out, never alter, an image). batch_size is part of
# it: it leaves every image as it is but decides what the records' timings mean (batch-1 latency, or
# throughput of one batch size), so one run dir holds the timings of one batch size (README "The run directory").
IDENTITY_KEYS = ("model", "decoder", "sampling", "seed", "prompts", "fingerprint", "batch_size")
IDENTITY_IGNORED = {"prompts.limit", "prompts.geneval_folder"}


class RunDirConflict(UserError):
    """The run directory holds results of a different configuration."""


def config_identity(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened settings that decide what an image is (see ``IDENTITY_KEYS``)."""
    flat = flatten({k: conf.get(k) for k in IDENTITY_KEYS})
    flat["batch_size"] = conf.get("batch_size") or 1  # run dirs written before batching decoded at batch 1
    return {k: v for k, v in flat.items() if k not in IDENTITY_IGNORED}


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """Size + first and last MiB: tells retrained weights apart without reading 14 GB."""
    size = path.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return h.hexdigest()


def weights_fingerprint(model_cfg: Mapping[str, Any]) -> str:
    """A digest of the model's config and weight files (``path``, ``vq_path``); a hub id not on disk counts
    by its name (the hub revision decides its files)."""
    from models import resolve_path

    h = hashlib.sha1(json.dumps({k: v for k, v in model_cfg.items() if k != "name"}, sort_keys=True,
                                default=str).encode())
    for key in ("path", "vq_path"):
        if not model_cfg.get(key):
            continue
        root = resolve_path(str(model_cfg[key]))
        files = [root] if root.is_file() else sorted(  # hidden entries *inside* the folder are skipped only
            p for p in root.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(root).parts))
        for f in files:
            h.update(f"{f.relative_to(root) if f != root else f.name}:{_file_digest(f)}".encode())
    return h.hexdigest()[:16]


def prompts_fingerprint(prompts: Sequence[Prompt]) -> str:
    """A digest of the whole prompt set's content (every prompt, before ``limit``)."""
    rows = [(p.idx, p.prompt, p.category, dict(p.meta)) for p in prompts]
    return hashlib.sha1(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_diffs(run_dir: Path, conf: Mapping[str, Any]) -> list[str]:
    """What differs between the run dir's configuration and ``conf`` (empty: the same, or a new dir).

    A run dir written before fingerprints existed has none: its fingerprint is taken as matching.
    """
    old_file = run_dir / CONFIG_FILE
    if not old_file.exists():
        return []
    old = config_identity(OmegaConf.to_container(OmegaConf.load(old_file), resolve=False))
    new = config_identity(conf)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not (k.startswith("fingerprint.") and k not in old)]


def check_same_config(run_dir: Path, conf: Mapping[str, Any]) -> None:
    """Refuse to add images of one configuration to a run dir that holds another's."""
    diffs = config_diffs(run_dir, conf)
    if diffs:
        what = "; ".join(diffs)
        why = (" (the prompt file's content changed)" if "fingerprint.prompts" in what else "") + \
              (" (the weights changed)" if "fingerprint.weights" in what else "")
        raise RunDirConflict(
            f"run dir {run_dir} holds results of another configuration ({what}){why}. Pick another "
            "out_dir=..., or pass force=true to start it over (its results move to superseded/, none is relabelled)"
        )


def check_writable(run_dir: Path) -> None:
    """Refuse an out_dir whose nearest existing folder cannot be written, before anything is created."""
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"out_dir={run_dir} cannot be written ({probe} is not a writable folder); "
                        "pick another out_dir=...")
