"""FID of a run's images against a folder of real images, on torchmetrics' ``FrechetInceptionDistance``.

Math: torchmetrics (``feature=`` any ``nn.Module`` with ``num_features``; no torch-fidelity needed).
Features: ``inception`` = the pool3 Inception-v3 of the TF FID, from clean-fid's TorchScript file
(``inception-2015-12-05.pt``; or torch-fidelity's extractor when that package imports), or ``shapes`` =
the project's shapes feature network (:mod:`models.shapes_features`). Resize to the extractor's input
size (299 px for Inception), one of two published conventions:

* ``clean`` (clean-fid ``resize.py``, mode "clean"): each channel of the uint8 image as a float PIL image,
  ``Image.resize(BICUBIC)`` (antialiased), clipped to 0..255, not re-quantised;
* ``pytorch_fid`` (pytorch-fid ``inception.py``, used by the SJD evaluation code): the float image
  tensor resized by ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialias).

Both hand the extractor float ``[N, 3, S, S]`` on the 0..255 scale. The real images are the
``record["coco_file_name"]`` files of the run's distinct ``coco_image_id`` in ``reference_dir``; their
statistics are cached in ``cache_dir`` keyed by (reference set, extractor + weights hash, resize, count).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from eval.images import Unreadable, batches, iter_images, read_rgb, warn_unreadable

PROTOCOL = ("torchmetrics FrechetInceptionDistance over a pluggable extractor (inception: clean-fid's "
            "TorchScript pool3, 2048-d; shapes: models.shapes_features, 128-d); resize clean = PIL bicubic "
            "per float channel (clean-fid), pytorch_fid = bilinear F.interpolate (pytorch-fid); real images = "
            "one per distinct coco_image_id from reference_dir; unreadable generated images skipped and counted")

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "SJD2_INCEPTION"
COCO_KINDS = ("coco_longest", "coco_sample")
PROGRESS_MIN_IMAGES = 200


@dataclass(frozen=True)
class FidOptions:
    """The ``fid:`` options of ``conf/eval/*.yaml`` (same names)."""

    reference_dir: str | None = None      # folder of real images (COCO val2017/ ...)
    features: str = "inception"           # inception | shapes
    inception_path: str | None = None     # default: $SJD2_INCEPTION, then ~/.cache/sjd2/inception-2015-12-05.pt
    inception_source: str = "clean_fid"   # clean_fid (TorchScript file) | torch_fidelity (that package)
    shapes_path: str | None = None        # shapes feature weights; default: models/weights/shapes_features/
    resize: str = "clean"                 # clean | pytorch_fid
    cache_dir: str = "runs/cache/fid"
    batch_size: int = 50
    device: str = "cpu"
    allow_count_mismatch: bool = False


def parse_options(options: Mapping[str, Any]) -> FidOptions:
    """``FidOptions`` from a mapping; unknown keys and bad choices fail naming the valid ones."""
    known = {f.name for f in fields(FidOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown fid option(s) {unknown}; known: {sorted(known)} (fix eval.options.fid)")
    opts = FidOptions(**{k: v for k, v in options.items() if v is not None})
    for name, valid in (("features", ("inception", "shapes")), ("resize", ("clean", "pytorch_fid")),
                        ("inception_source", ("clean_fid", "torch_fidelity"))):
        if getattr(opts, name) not in valid:
            raise ValueError(f"fid option {name}={getattr(opts, name)!r}; expected one of {valid}")
    return opts


# ---------------------------------------------------------------------------------------------------
# Resize conventions: uint8 images [H, W, 3] -> float [N, 3, S, S] on 0..255


def resize_clean(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """clean-fid's "clean": per channel, float PIL image, bicubic resize, clip 0..255, no quantisation."""
    from PIL import Image

    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, img in enumerate(images):
        for c in range(3):
            ch = Image.fromarray(np.asarray(img[:, :, c], dtype=np.float32), mode="F")
            out[i, c] = np.asarray(ch.resize((size, size), resample=Image.BICUBIC)).clip(0, 255)
    return torch.from_numpy(out)


def resize_pytorch_fid(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """pytorch-fid's: the float image tensor, ``F.interpolate`` bilinear, align_corners=False."""
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float()
    if x.shape[-2:] == (size, size):
        return x.contiguous()
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


RESIZERS = {"clean": resize_clean, "pytorch_fid": resize_pytorch_fid}


# ---------------------------------------------------------------------------------------------------
# Extractors: nn.Modules with num_features and input_size, taking float [N, 3, S, S] on 0..255


class CleanFidInception(nn.Module):
    """clean-fid's TorchScript Inception as clean-fid calls it: ``base.layers((x - 128) / 128)`` at 299 px."""

    num_features = 2048
    input_size = 299

    def __init__(self, base: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.layers.forward((x.float() - 128) / 128).reshape(x.shape[0], self.num_features)


class TorchFidelityInception(nn.Module):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (uint8 input; its own resize to 299 inside)."""

    num_features = 2048
    input_size = 299

    def __init__(self, weights_path: str | None) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=weights_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.round().clamp(0, 255).to(torch.uint8))[0].reshape(x.shape[0], self.num_features)


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path) -> str:
    """sha256 (first 16 hex) of a weights file, memoised on (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()[:16]
    return _FILE_HASHES[key]


def inception_file(opts: FidOptions) -> Path:
    """The TorchScript Inception: ``inception_path``, else $SJD2_INCEPTION, else ~/.cache/sjd2/; must exist."""
    raw = opts.inception_path or os.environ.get(INCEPTION_ENV) or str(Path.home() / ".cache" / "sjd2" / INCEPTION_FILE)
    path = Path(raw).expanduser()
    if path.is_dir():
        path = path / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} not found: download clean-fid's {INCEPTION_FILE} from "
                                f"{INCEPTION_URL} and pass eval.options.fid.inception_path=FILE (or set "
                                f"${INCEPTION_ENV}, or put it in ~/.cache/sjd2/)")
    return path


def load_extractor(opts: FidOptions) -> tuple[nn.Module, str]:
    """(extractor in eval mode, its name including a hash of its weights) for the options."""
    if opts.features == "shapes":
        from models.shapes_features import WEIGHTS_DIR, WEIGHTS_FILE, load_shapes_features

        path = Path(opts.shapes_path) if opts.shapes_path else WEIGHTS_DIR
        module = load_shapes_features(path)
        return module, f"shapes_features@{file_hash(path / WEIGHTS_FILE if path.is_dir() else path)}"
    if opts.inception_source == "torch_fidelity":
        try:
            import torch_fidelity
        except ImportError as e:
            raise ValueError(f"fid inception_source=torch_fidelity needs the torch-fidelity package ({e}); "
                             "`pip install torch-fidelity` (it imports torchvision), or use "
                             "inception_source=clean_fid with clean-fid's TorchScript file") from None
        weights = opts.inception_path
        tag = file_hash(Path(weights)) if weights else "default"
        return TorchFidelityInception(weights).eval(), f"torch_fidelity-{torch_fidelity.__version__}@{tag}"
    path = inception_file(opts)
    base = torch.jit.load(str(path), map_location="cpu").eval()
    return CleanFidInception(base).eval(), f"clean_fid_inception@{file_hash(path)}"


# ---------------------------------------------------------------------------------------------------
# The real set


def check_coco_run(run: Any) -> None:
    """Every record must carry ``coco_file_name`` / ``coco_image_id`` (a COCO-format prompt set)."""
    if not run.records or any("coco_file_name" not in r or "coco_image_id" not in r for r in run.records):
        prompts = run.config.get("prompts", {})
        name = prompts.get("name") or prompts.get("kind")
        raise ValueError(f"run dir {run.run_dir} decoded from prompts={name}; FID needs a COCO-format prompt set "
                         f"(records with coco_image_id / coco_file_name, prompts.kind in {COCO_KINDS})")


def reference_files(records: Sequence[Mapping[str, Any]], reference_dir: str | None) -> list[Path]:
    """The real image of each distinct ``coco_image_id`` (first-seen order); errors name the fix."""
    if not reference_dir:
        raise ValueError("fid needs eval.options.fid.reference_dir=DIR (the real images, e.g. COCO val2017/)")
    ref = Path(reference_dir).expanduser()
    if not ref.is_dir():
        raise FileNotFoundError(f"fid reference_dir {ref} does not exist; point eval.options.fid.reference_dir "
                                "at the folder of real images (e.g. COCO val2017/)")
    names: dict[Any, str] = {}
    for r in records:
        names.setdefault(r["coco_image_id"], str(r["coco_file_name"]))
    files = [ref / n for n in names.values()]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"fid reference_dir {ref} lacks {len(missing)} of the {len(files)} real images "
                                f"the run's prompts name (first missing: {missing[0].name}); use the image folder "
                                "of the captions file the prompts came from (val2017/ for COCO2017)")
    return files


def cache_key(files: Sequence[Path], extractor_name: str, resize: str) -> tuple[str, dict[str, Any]]:
    """(hash, the material it hashes): resolved folder + sorted names, extractor + weights, resize, count."""
    material = {"reference_dir": str(files[0].parent.resolve()) if files else "",
                "files": sorted(f.name for f in files), "extractor": extractor_name, "resize": resize,
                "n_images": len(files)}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24], material


def _progress(items: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    if total <= PROGRESS_MIN_IMAGES:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="img", leave=False)


def accumulate(metric: Any, images: Iterable[np.ndarray], total: int, real: bool, opts: FidOptions,
               size: int, desc: str) -> int:
    """Resize and feed uint8 [H, W, 3] images to ``metric`` in batches; the number fed."""
    n = 0
    for batch in batches(_progress(images, total, desc), opts.batch_size):
        x = RESIZERS[opts.resize](batch, size).to(opts.device)
        with torch.no_grad():
            metric.update(x, real=real)
        n += len(batch)
    return n


STAT_NAMES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def reference_stats(metric: Any, files: Sequence[Path], extractor_name: str, opts: FidOptions) -> Path:
    """Fill ``metric``'s real statistics from the cache, or from the images (then write the cache)."""
    from core.rundir import atomic_write_bytes

    key, material = cache_key(files, extractor_name, opts.resize)
    path = Path(opts.cache_dir) / f"ref_{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        for name in STAT_NAMES:
            setattr(metric, name, saved[name].to(opts.device))
        return path
    images = (np.asarray(read_rgb(f)) for f in files)  # a broken real image is an error naming it
    accumulate(metric, images, len(files), True, opts, metric.inception.input_size, "fid real")
    buf = io.BytesIO()
    torch.save({**{n: getattr(metric, n).cpu() for n in STAT_NAMES}, "key": material}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------------------
# The metric


def fid_metric(run: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``fid`` metric of :mod:`eval.run`: FID of ``run``'s images vs the matched real images."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    opts = parse_options(options)
    check_coco_run(run)
    files = reference_files(run.records, opts.reference_dir)
    if len(files) != len(run.records) and not opts.allow_count_mismatch:
        raise ValueError(f"fid: {len(run.records)} generated images vs {len(files)} real images (distinct "
                         "coco_image_id); FID is biased by set size, so they must match: decode one image per "
                         "prompt of a one-caption-per-image set, or set eval.options.fid.allow_count_mismatch=true")
    extractor, extractor_name = load_extractor(opts)
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False).to(opts.device)
    cache = reference_stats(metric, files, extractor_name, opts)
    unreadable = Unreadable()
    generated = (np.asarray(im) for _, im in iter_images(run.run_dir, run.records, unreadable))
    n_gen = accumulate(metric, generated, len(run.records), False, opts, extractor.input_size, "fid generated")
    warn_unreadable("fid", unreadable)
    if n_gen < 2:
        raise ValueError(f"fid: only {n_gen} readable generated image(s) in {run.run_dir}; FID needs at least 2")
    return {"fid": float(metric.compute()), "fid_n_real": int(metric.real_features_num_samples),
            "fid_n_generated": n_gen, "fid_features": extractor_name, "fid_resize": opts.resize,
            "fid_reference_cache": str(cache), **unreadable.summary("fid")}

