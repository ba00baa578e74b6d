"""Reading a run's images for the image metrics (FID, CLIP score, GenEval, shapes), one way for all.

An image that cannot be read (missing, truncated, not an image) is named and skipped, never fatal: the
metric scores the others and reports ``<metric>_n_unreadable`` with the file names in its result.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Unreadable:
    """The images of a run that could not be read: (path, reason) in record order."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: Path, reason: str) -> None:
        self.items.append((str(path), reason))

    def summary(self, metric: str) -> dict[str, Any]:
        """The keys a metric adds to its result: the count, and the files (first 20) with why."""
        out: dict[str, Any] = {f"{metric}_n_unreadable": len(self.items)}
        if self.items:
            out[f"{metric}_unreadable"] = [f"{p}: {why}" for p, why in self.items[:20]]
        return out


def read_rgb(path: str | Path):
    """The image at ``path`` as a fully loaded RGB ``PIL.Image``; ``OSError`` naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later inside a metric
            return im.convert("RGB")
    except FileNotFoundError:
        raise OSError(f"{path}: missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise OSError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def iter_images(run_dir: Path, records: Sequence[Mapping[str, Any]], unreadable: Unreadable,
                ) -> Iterator[tuple[Mapping[str, Any], Any]]:
    """(record, RGB image) for every record whose ``image`` file reads; the others go to ``unreadable``."""
    for r in records:
        path = Path(run_dir) / r["image"]
        try:
            image = read_rgb(path)
        except OSError as e:
            unreadable.add(path, str(e).split(": ", 1)[-1])
            continue
        yield r, image


def warn_unreadable(metric: str, unreadable: Unreadable) -> None:
    """One line on stderr per run with unreadable images (the count and the first file)."""
    import sys

    if unreadable.items:
        path, why = unreadable.items[0]
        more = f" and {len(unreadable.items) - 1} more" if len(unreadable.items) > 1 else ""
        print(f"warning: {metric}: {len(unreadable.items)} unreadable image(s), skipped: {path} ({why}){more}; "
              "re-decode them (remove their lines from samples*.jsonl and run decode again)", file=sys.stderr)


def per_image_path(run_dir: str | Path, metric: str) -> Path:
    """``<run_dir>/per_image_<metric>.jsonl``: one line per scored image (the paired comparisons read it)."""
    return Path(run_dir) / f"per_image_{metric}.jsonl"


def write_per_image(run_dir: str | Path, metric: str, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write the per-image values of ``metric`` (each row: ``idx``, ``sample`` and the values), atomically."""
    import json

    from core.rundir import atomic_write_bytes

    path = per_image_path(run_dir, metric)
    atomic_write_bytes(path, "".join(json.dumps(dict(r)) + "\n" for r in rows).encode())
    return path


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of ``size`` (the last one shorter), without holding more than one batch."""
    batch: list[Any] = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
