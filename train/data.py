"""Pre-tokenised image-caption shards for fine-tuning (SJD2 stage 1).

Each image is resized/center-cropped to the model's ``image_size`` and encoded with the model's own
VQ encoder (``adapter.encode_image``); the caption goes through the model's prompt template
(``adapter.prompt_ids``). One row = ``input_ids`` (prompt ids + the full image sequence, head and tail
tokens included) and ``prompt_len``; the trainer puts labels on ``input_ids[prompt_len:]``.

Sources:

* an image folder with ``captions.jsonl`` (one ``{"file": <path relative to the folder>, "caption": ...}``
  per line),
* an image folder with a ``<stem>.txt`` caption beside every image,
* a ``datasets`` dataset (an object, or a folder written by ``save_to_disk``) with an image column
  (PIL images or paths) and a text column.

Output folder: ``manifest.json`` (model, image size, layout length, source, shard size, item count) and
``shard_00000/``, ``shard_00001/``, ... each a ``datasets`` dataset saved with ``save_to_disk``. A shard
folder exists only once complete (written to a temporary name, then renamed), so an interrupted run
resumes by skipping finished shards. ``load_shards(out_dir)`` concatenates them.

CLI::

    python -m train.data model=lumina_mgpt_tiny_random source=path/to/images out_dir=data/shards/x \\
        [shard_size=1000] [limit=N] [image_column=image] [text_column=text] [model.image_size=256]
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST = "manifest.json"
CAPTIONS_FILE = "captions.jsonl"


@dataclass(frozen=True)
class ShardConfig:
    """How a source becomes shards (CLI keys are these field names)."""

    shard_size: int = 1000  # rows per shard
    image_column: str = "image"  # datasets sources only
    text_column: str = "text"  # datasets sources only
    limit: int | None = None  # first N pairs only (None: all)
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {self.limit}")


@dataclass(frozen=True)
class Pair:
    """One image-caption pair; the image is opened only when needed."""

    key: str  # file name or dataset row index (for error messages)
    caption: str
    load: Callable[[], Any]  # -> PIL.Image


# ---------------------------------------------------------------------------------------------------
# Images


def fit_image(image: Any, size: int) -> Any:
    """RGB (alpha blended onto white), shorter side resized to ``size``, center-cropped to ``size`` x ``size``.

    Large images are first halved with a box filter while both sides stay >= 2 * size (as Lumina-mGPT's
    ``center_crop``), then resized with bicubic filtering.
    """
    from PIL import Image

    if image.mode != "RGB":
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    while image.size[0] >= 2 * size and image.size[1] >= 2 * size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    scale = size / min(image.size)
    new = (max(size, round(image.size[0] * scale)), max(size, round(image.size[1] * scale)))
    if new != image.size:
        image = image.resize(new, resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def _open_image(path: Path) -> Callable[[], Any]:
    def load() -> Any:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            return im.copy()

    return load


# ---------------------------------------------------------------------------------------------------
# Sources


def _pairs_from_jsonl(root: Path) -> list[Pair]:
    pairs = []
    path = root / CAPTIONS_FILE
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg}); expected {{\"file\": ..., \"caption\": ...}}") from err
        if not isinstance(row, dict) or not isinstance(row.get("file"), str) or not isinstance(row.get("caption"), str):
            raise ValueError(f"{where}: expected an object with string fields \"file\" and \"caption\", got {line[:120]!r}")  # noqa: TRY004
        image = root / row["file"]
        if not image.is_file():
            raise FileNotFoundError(f"{where}: image {image} does not exist")
        pairs.append(Pair(row["file"], row["caption"], _open_image(image)))
    if not pairs:
        raise ValueError(f"{path} holds no caption lines")
    return pairs


def _pairs_from_sidecars(root: Path) -> list[Pair]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(
            f"{root} holds no images; expected images with <stem>.txt captions, a {CAPTIONS_FILE}, "
            "or a datasets folder written by save_to_disk"
        )
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) in {root} have no caption file, e.g. {missing[0].with_suffix('.txt')}; "
            f"add <stem>.txt beside each image or write a {CAPTIONS_FILE}"
        )
    return [Pair(str(p.relative_to(root)), p.with_suffix(".txt").read_text(encoding="utf-8").strip(), _open_image(p))
            for p in images]


def _pairs_from_dataset(ds: Any, image_column: str, text_column: str) -> list[Pair]:
    for col in (image_column, text_column):
        if col not in ds.column_names:
            raise KeyError(f"dataset has no column {col!r} (columns: {ds.column_names}); set image_column/text_column")

    def loader(i: int) -> Callable[[], Any]:
        def load() -> Any:
            value = ds[i][image_column]
            return _open_image(Path(value))() if isinstance(value, (str, Path)) else value

        return load

    texts = ds[text_column]
    return [Pair(str(i), str(texts[i]), loader(i)) for i in range(len(ds))]


def open_source(source: Any, image_column: str = "image", text_column: str = "text") -> list[Pair]:
    """Pairs of a folder (captions.jsonl or .txt sidecars), a save_to_disk folder, or a datasets object."""
    if not isinstance(source, (str, Path)):
        return _pairs_from_dataset(source, image_column, text_column)
    root = Path(source).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"source {root} is not a folder")
    if (root / CAPTIONS_FILE).is_file():
        return _pairs_from_jsonl(root)
    if (root / "dataset_info.json").is_file() or (root / "dataset_dict.json").is_file():
        import datasets

        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{root} is a DatasetDict ({list(ds)}); point source at one split's folder")
        return _pairs_from_dataset(ds, image_column, text_column)
    return _pairs_from_sidecars(root)


# ---------------------------------------------------------------------------------------------------
# Shards


def tokenize_pair(adapter: Any, image: Any, caption: str) -> tuple[list[int], int]:
    """(prompt ids + full image sequence, prompt length) of one pair."""
    prompt = list(adapter.prompt_ids(caption))
    image_ids = adapter.encode_image(fit_image(image, int(adapter.image_size)))
    return prompt + [int(t) for t in image_ids.tolist()], len(prompt)


def _manifest(adapter: Any, source: Any, n_items: int, cfg: ShardConfig) -> dict:
    return {
        "model": adapter.name,
        "image_size": int(adapter.image_size),
        "image_tokens": int(adapter.layout.n_tokens),
        "source": str(source) if isinstance(source, (str, Path)) else type(source).__name__,
        "n_items": n_items,
        "shard_size": cfg.shard_size,
        "columns": ["input_ids", "prompt_len"],
    }


def _check_manifest(out_dir: Path, manifest: dict) -> None:
    path = out_dir / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        keys = ("model", "image_size", "image_tokens", "n_items", "shard_size")
        diff = {k: (old.get(k), manifest[k]) for k in keys if old.get(k) != manifest[k]}
        if diff:
            raise ValueError(
                f"{out_dir} already holds shards made with other settings {diff} (old, new); "
                "use a new out_dir or delete the old one"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1))


def _write_shard(rows: list[tuple[list[int], int]], shard_dir: Path) -> None:
    import datasets

    features = datasets.Features(
        {"input_ids": datasets.Sequence(datasets.Value("int32")), "prompt_len": datasets.Value("int32")}
    )
    ds = datasets.Dataset.from_dict(
        {"input_ids": [r[0] for r in rows], "prompt_len": [r[1] for r in rows]}, features=features
    )
    tmp = shard_dir.with_name(shard_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    bars_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # our own bar counts images; no per-shard "Saving" bars
    try:
        ds.save_to_disk(str(tmp))
    finally:
        if bars_on:
            datasets.enable_progress_bars()
    tmp.rename(shard_dir)


def shard_dirs(out_dir: str | Path) -> list[Path]:
    """Finished shard folders, in order."""
    return sorted(p for p in Path(out_dir).glob("shard_[0-9]*") if p.is_dir() and not p.name.endswith(".tmp"))


def prepare_shards(
    adapter: Any,
    source: Any,
    out_dir: str | Path,
    shard_size: int = 1000,
    image_column: str = "image",
    text_column: str = "text",
    limit: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Tokenise ``source`` into shards under ``out_dir``; finished shards are skipped. Returns all shard dirs."""
    cfg = ShardConfig(shard_size, image_column, text_column, limit, progress)
    pairs = open_source(source, cfg.image_column, cfg.text_column)
    if cfg.limit is not None:
        pairs = pairs[: cfg.limit]
    out_dir = Path(out_dir)
    _check_manifest(out_dir, _manifest(adapter, source, len(pairs), cfg))
    n_shards = math.ceil(len(pairs) / cfg.shard_size)
    todo = [s for s in range(n_shards) if not (out_dir / f"shard_{s:05d}").is_dir()]
    bar = _progress(len(pairs), len(pairs) - sum(len(_shard_items(pairs, s, cfg)) for s in todo), cfg.progress)
    for s in todo:
        rows = []
        for pair in _shard_items(pairs, s, cfg):
            rows.append(_tokenize_checked(adapter, pair))
            bar.update(1)
        _write_shard(rows, out_dir / f"shard_{s:05d}")
    bar.close()
    return shard_dirs(out_dir)


def _shard_items(pairs: Sequence[Pair], s: int, cfg: ShardConfig) -> Sequence[Pair]:
    return pairs[s * cfg.shard_size : (s + 1) * cfg.shard_size]


def _tokenize_checked(adapter: Any, pair: Pair) -> tuple[list[int], int]:
    try:
        return tokenize_pair(adapter, pair.load(), pair.caption)
    except Exception as err:
        if hasattr(err, "add_note"):  # Python >= 3.11: name the failing pair in the traceback
            err.add_note(f"while tokenising pair {pair.key!r} (caption {pair.caption[:80]!r})")
        raise


def _progress(total: int, done: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, disable=not enabled, desc="tokenising", unit="img")


def load_shards(out_dir: str | Path) -> Any:
    """All finished shards of ``out_dir`` as one ``datasets.Dataset``."""
    import datasets

    dirs = shard_dirs(out_dir)
    if not dirs:
        raise FileNotFoundError(f"no shards in {out_dir}; run `python -m train.data model=... source=... out_dir=...`")
    return datasets.concatenate_datasets([datasets.load_from_disk(str(d)) for d in dirs])


# ---------------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: Sequence[str]) -> tuple[dict, list[str]]:
    args, model_overrides = {}, []
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"arguments are key=value (got {arg!r}); see `python -m train.data --help`")
        key, value = arg.split("=", 1)
        if key.startswith("model."):
            model_overrides.append(f"{key[len('model.'):]}={value}")
        else:
            args[key] = value
    return args, model_overrides


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """``python -m train.data model=<conf/model name or yaml> source=<folder> out_dir=<folder> [...]``."""
    from omegaconf import OmegaConf

    from models import REPO_ROOT, load_adapter

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return []
    args, overrides = _parse_args(argv)
    for key in ("model", "source", "out_dir"):
        if key not in args:
            raise SystemExit(f"missing {key}=...; usage: python -m train.data model=NAME source=DIR out_dir=DIR")
    model_file = Path(args.pop("model"))
    if not model_file.suffix:
        model_file = REPO_ROOT / "conf" / "model" / f"{model_file}.yaml"
    if not model_file.is_file():
        raise SystemExit(f"model config {model_file} does not exist; pick one of conf/model/*.yaml")
    model_cfg = OmegaConf.merge(OmegaConf.load(model_file), OmegaConf.from_dotlist(overrides))
    known = {f for f in ShardConfig.__dataclass_fields__}
    unknown = sorted(set(args) - known - {"source", "out_dir"})
    if unknown:
        raise SystemExit(f"unknown argument(s) {unknown}; allowed: model, source, out_dir, {sorted(known)}")
    opts = OmegaConf.to_container(OmegaConf.from_dotlist([f"{k}={v}" for k, v in args.items()]))
    cfg = ShardConfig(**{k: v for k, v in opts.items() if k in known})
    adapter = load_adapter(OmegaConf.to_container(model_cfg, resolve=True))
    return prepare_shards(adapter, opts["source"], opts["out_dir"], **asdict(cfg))


if __name__ == "__main__":
    main()
