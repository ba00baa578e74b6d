"""Prompt sets for the decode stage (DESIGN.md sections 2 and 8), one loader per ``kind``.

``load_prompts(cfg)`` takes a ``conf/prompts/*.yaml`` mapping and returns :class:`Prompt` rows with
stable indices. Every loader checks its file before any decoding starts and raises
:class:`PromptSetError` naming the file and the fix.

kinds
-----
``shapes``       the embedded eval prompts (``data/shapes_eval.jsonl``, 200 prompts, 6 categories).
``geneval``      GenEval's ``evaluation_metadata.jsonl`` (553 prompts; ``category`` = its ``tag``, the
                 whole line kept in ``meta`` for the GenEval folder contract).
``coco_longest`` COCO2017-5k: the longest caption of every image of ``captions_val2017.json``
                 (ties: the lower annotation id), ordered by image id.
``coco_sample``  COCO2014-30k: ``n`` captions of ``captions_val2014.json`` drawn with ``sample_seed``;
                 ``unique_images: true`` draws ``n`` distinct images and one caption of each.
                 Both read the file with pycocotools' ``COCO``; every prompt's ``meta`` holds its image id and
                 file name (decode records them: FID matches real images by them); with ``image_dir`` set,
                 every named image must be in that folder.
``shapes_coco``  the shapes eval prompts as a COCO captions set with renders as the "val" images
                 (:mod:`data.shapes_coco`, written under ``root`` on first use), read as ``coco_longest``.
``file``         a plain text file (one prompt per line, blank lines skipped), a ``.jsonl`` file of
                 objects with ``prompt`` (optional ``category``), or a ``.json`` list of either.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GENEVAL_PATH = Path(__file__).with_name("geneval") / "evaluation_metadata.jsonl"
COCO_HINT = (
    "download the COCO annotations (https://cocodataset.org/#download, 'annotations_trainval{year}.zip') "
    "and pass prompts.path=/path/to/annotations/captions_val{year}.json"
)


class PromptSetError(ValueError):
    """A prompt file is missing or malformed (the message names the file and the fix)."""


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``idx`` is stable across runs: it names the image file and seeds the sample."""

    idx: int
    prompt: str
    category: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)  # the source record (e.g. a GenEval line)


# ---------------------------------------------------------------------------------------------------
# File reading with clear errors


def _require_file(path: Any, what: str, fix: str) -> Path:
    if path is None or str(path) == "":
        raise PromptSetError(f"{what}: no file given; {fix}")
    from models import resolve_path

    p = resolve_path(str(path))
    if not p.is_file():
        raise PromptSetError(f"{what}: file {p} does not exist; {fix}")
    return p


def _read_jsonl(path: Path, fix: str) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptSetError(f"{path}:{line_no} is not valid JSON ({e.msg}); {fix}") from None
            if not isinstance(row, dict):
                raise PromptSetError(f"{path}:{line_no} is not a JSON object; {fix}")
            rows.append(row)
    if not rows:
        raise PromptSetError(f"{path} holds no prompts; {fix}")
    return rows


def _read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PromptSetError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None


def _text_of(row: Mapping[str, Any], where: str, fix: str) -> str:
    text = row.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise PromptSetError(f"{where}: missing or empty 'prompt' string; {fix}")
    return text.strip()


# ---------------------------------------------------------------------------------------------------
# Loaders: cfg mapping -> list[Prompt]


def load_shapes(cfg: Mapping[str, Any]) -> list[Prompt]:
    """The embedded shapes eval prompts (``path: null`` -> ``data/shapes_eval.jsonl``)."""
    from data import shapes

    fix = "regenerate it with `python -m data.shapes` or set prompts.path to a shapes jsonl"
    path = _require_file(cfg.get("path") or shapes.EVAL_PATH, "prompts=shapes", fix)
    rows = _read_jsonl(path, fix)
    from data.shapes_check import caption_metadata

    out = []
    for i, row in enumerate(rows):
        text = _text_of(row, f"{path}:{i + 1}", fix)
        try:  # GenEval's metadata of the caption: the geneval folder / metric score shapes runs by GenEval's rules
            meta = caption_metadata(text)
        except ValueError:  # outside the caption grammar: no metadata (the shapes score refuses it later)
            meta = {}
        out.append(Prompt(int(row.get("idx", i)), text, row.get("category"), meta=meta))
    return out


def load_geneval(cfg: Mapping[str, Any]) -> list[Prompt]:
    """GenEval's 553 prompts; the whole metadata line is kept for ``<dir>/geneval/<00000>/metadata.jsonl``."""
    fix = ("fetch GenEval's prompts/evaluation_metadata.jsonl with `make geneval-prompts` "
           "(from https://github.com/djghosh13/geneval, MIT) or point prompts.path at your copy")
    path = _require_file(cfg.get("path") or GENEVAL_PATH, "prompts=geneval", fix)
    rows = _read_jsonl(path, fix)
    out = []
    for i, row in enumerate(rows):
        where = f"{path}:{i + 1}"
        if "tag" not in row or "include" not in row:
            raise PromptSetError(f"{where}: a GenEval line needs 'tag' and 'include'; {fix}")
        out.append(Prompt(i, _text_of(row, where, fix), str(row["tag"]), meta=row))
    return out


def _coco_captions(cfg: Mapping[str, Any], year: int) -> tuple[Path, list[dict], dict[int, dict]]:
    """(file, caption annotations, images by id) of a COCO captions file, read with pycocotools."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    fix = cfg.get("fix") or COCO_HINT.format(year=year)
    path = _require_file(cfg.get("path"), f"prompts={cfg.get('name', 'coco')}", fix)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
            coco = COCO(str(path))
    except json.JSONDecodeError as e:
        raise PromptSetError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
    except (AssertionError, KeyError, TypeError) as e:
        raise PromptSetError(f"{path} is not a COCO annotations file ({type(e).__name__}: {e}); {fix}") from None
    anns = list(coco.anns.values())
    if not anns:
        raise PromptSetError(f"{path} has no 'annotations' list; is it a COCO captions file? {fix}")
    for a in anns:
        if not {"image_id", "id", "caption"} <= set(a):
            raise PromptSetError(f"{path}: annotation {a.get('id')} needs image_id, id and caption; {fix}")
        if a["image_id"] not in coco.imgs or "file_name" not in coco.imgs[a["image_id"]]:
            raise PromptSetError(f"{path}: annotation {a['id']} names image {a['image_id']}, which the file's "
                                 f"'images' list lacks (or gives no file_name); {fix}")
    return path, anns, coco.imgs


def _coco_prompts(cfg: Mapping[str, Any], path: Path, picked: list[dict], images: dict[int, dict]) -> list[Prompt]:
    """Prompts of the chosen captions, each with its image id and file name; ``image_dir`` is checked."""
    out = [Prompt(i, a["caption"].strip(), meta={"image_id": int(a["image_id"]), "caption_id": a["id"],
                                                  "file_name": images[a["image_id"]]["file_name"]})
           for i, a in enumerate(picked)]
    if cfg.get("image_dir"):
        from models import resolve_path

        folder = resolve_path(str(cfg["image_dir"]))
        missing = [p.meta["file_name"] for p in out if not (folder / p.meta["file_name"]).is_file()]
        if missing:
            raise PromptSetError(
                f"{len(missing)} of {len(out)} images named by {path} are not in prompts.image_dir={folder} "
                f"(first: {missing[0]}); pass the val{cfg.get('year', '')} image folder that belongs to this "
                "captions file")
    return out


def load_coco_longest(cfg: Mapping[str, Any]) -> list[Prompt]:
    """COCO2017-5k: one prompt per val image, its longest caption (ties: the lower annotation id)."""
    path, anns, images = _coco_captions(cfg, int(cfg.get("year", 2017)))
    best: dict[int, dict] = {}
    for a in anns:
        cap, key = a["caption"].strip(), int(a["image_id"])
        old = best.get(key)
        if old is None or (len(cap), -a["id"]) > (len(old["caption"].strip()), -old["id"]):
            best[key] = a
    return _coco_prompts(cfg, path, [best[img] for img in sorted(best)], images)


def load_coco_sample(cfg: Mapping[str, Any]) -> list[Prompt]:
    """COCO2014-30k: ``n`` captions drawn with ``sample_seed`` (numpy PCG64), sorted by annotation id first."""
    path, anns, images = _coco_captions(cfg, int(cfg.get("year", 2014)))
    n, rng = int(cfg.get("n", 30000)), np.random.default_rng(int(cfg.get("sample_seed", 0)))
    anns = sorted(anns, key=lambda a: a["id"])
    if cfg.get("unique_images", True):
        by_image: dict[int, list[dict]] = {}
        for a in anns:
            by_image.setdefault(int(a["image_id"]), []).append(a)
        ids = sorted(by_image)
        if n > len(ids):
            raise PromptSetError(f"{path} has {len(ids)} images, fewer than prompts.n={n}; lower prompts.n")
        chosen = [by_image[ids[i]] for i in rng.choice(len(ids), size=n, replace=False)]
        picked = [caps[int(rng.integers(len(caps)))] for caps in chosen]
    else:
        if n > len(anns):
            raise PromptSetError(f"{path} has {len(anns)} captions, fewer than prompts.n={n}; lower prompts.n")
        picked = [anns[i] for i in rng.choice(len(anns), size=n, replace=False)]
    return _coco_prompts(cfg, path, picked, images)


def load_file(cfg: Mapping[str, Any]) -> list[Prompt]:
    """A user file: ``.txt`` (a prompt per line), ``.jsonl`` ({prompt, category?}) or ``.json`` (a list)."""
    fix = "pass prompts.path=FILE: a .txt with one prompt per line, a .jsonl of {\"prompt\": ...} or a .json list"
    path = _require_file(cfg.get("path"), "prompts=file", fix)
    if path.suffix == ".jsonl":
        rows: list[Any] = _read_jsonl(path, fix)
    elif path.suffix == ".json":
        rows = _read_json(path, fix)
        if not isinstance(rows, list) or not rows:
            raise PromptSetError(f"{path} must hold a non-empty JSON list; {fix}")
    else:
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not rows:
            raise PromptSetError(f"{path} holds no prompts; {fix}")
    out = []
    for i, row in enumerate(rows):
        where = f"{path} (prompt {i})"
        if isinstance(row, str):
            if not row.strip():
                raise PromptSetError(f"{where}: an empty prompt string (it would decode an unconditional image); "
                                     f"remove it or write its text; {fix}")
            out.append(Prompt(i, row.strip()))
        elif isinstance(row, dict):
            out.append(Prompt(i, _text_of(row, where, fix), row.get("category")))
        else:
            raise PromptSetError(f"{where}: expected a string or an object with 'prompt'; {fix}")
    return out


def load_shapes_coco(cfg: Mapping[str, Any]) -> list[Prompt]:
    """The shapes eval prompts as a COCO captions set (:mod:`data.shapes_coco`), written on first use."""
    from data.shapes_coco import CAPTIONS, IMAGES, write_shapes_coco
    from models import resolve_path

    root = resolve_path(str(cfg.get("root") or "runs/cache/shapes_coco"))
    write_shapes_coco(root, scene_seed=int(cfg.get("scene_seed", 0)))
    return load_coco_longest({**cfg, "path": str(root / CAPTIONS), "image_dir": str(root / IMAGES),
                              "fix": f"delete {root} to have it written again"})


LOADERS: dict[str, Callable[[Mapping[str, Any]], list[Prompt]]] = {
    "shapes": load_shapes,
    "geneval": load_geneval,
    "coco_longest": load_coco_longest,
    "coco_sample": load_coco_sample,
    "file": load_file,
    "shapes_coco": load_shapes_coco,
}


def load_prompts(cfg: Mapping[str, Any]) -> list[Prompt]:
    """``conf/prompts/*.yaml`` mapping -> prompts (the first ``limit`` when ``limit`` is set)."""
    kind = cfg.get("kind")
    if kind not in LOADERS:
        raise PromptSetError(f"unknown prompt-set kind {kind!r}; known: {sorted(LOADERS)} (see conf/prompts/)")
    prompts = LOADERS[kind](cfg)
    if len({p.idx for p in prompts}) != len(prompts):
        raise PromptSetError(f"prompts={cfg.get('name')}: duplicate 'idx' values in {cfg.get('path')}; make them unique")
    return apply_limit(prompts, cfg.get("limit"))


def apply_limit(prompts: list[Prompt], limit: Any) -> list[Prompt]:
    """The first ``limit`` prompts (all when ``limit`` is None); a limit below 1 is refused."""
    if limit is None:
        return prompts
    if int(limit) < 1:
        raise PromptSetError(f"prompts.limit={limit} must be >= 1 (or null for all)")
    return prompts[: int(limit)]
