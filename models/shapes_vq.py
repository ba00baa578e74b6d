"""The ``shapes`` image tokenizer: a patch VQ whose codebook is fitted by k-means on shapes images.

An image of H x W pixels becomes an (H/p) x (W/p) grid of codes; a code is the index of the nearest
codeword (squared L2 over the p*p*3 RGB values of a patch, in [0, 255]). Decoding pastes codewords back.

``fit`` runs weighted k-means (k-means++ init, torch, deterministic given ``seed``) over the *distinct*
training patches (white and flat-colour patches dominate, so this is a large saving), then snaps every
codeword to its medoid, the member patch nearest to the centroid, so decoded images keep the flat
palette colours that ``data.shapes_check.check`` reads (a centroid averages edge patches into pale blends).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

DEFAULT_PATH = "models/weights/shapes_vq.safetensors"
DEFAULT_N_CODES = 64
MAKE_HINT = "run `make tiny-model` to fit it"


def _patchify(arr: np.ndarray, patch: int) -> np.ndarray:
    """uint8 [B, H, W, 3] -> [B, H/p, W/p, p*p*3] (row-major pixels inside a patch)."""
    b, h, w, c = arr.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the {patch}px patch; resize it first")
    x = arr.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // patch, w // patch, patch * patch * c)


def _unpatchify(patches: np.ndarray, patch: int) -> np.ndarray:
    """[B, h, w, p*p*3] -> [B, h*p, w*p, 3]."""
    b, h, w, _ = patches.shape
    x = patches.reshape(b, h, w, patch, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * patch, w * patch, 3)


def _as_uint8(image) -> np.ndarray:
    """PIL image or uint8 array [H, W, 3] -> uint8 [H, W, 3]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
    return arr.astype(np.uint8, copy=False)


def _nearest(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of the nearest codeword for each row of x [M, D] -> [M] (ties: lowest index)."""
    c2 = (codebook * codebook).sum(1)  # [N]
    out = []
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        d = c2[None, :] - 2.0 * xs @ codebook.T  # [m, N]; ||x||^2 is constant per row
        out.append(d.argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


class PatchVQ:
    """Patch vector quantiser: ``codebook`` [n_codes, patch*patch*3] float32 in RGB units [0, 255]."""

    def __init__(self, codebook: torch.Tensor, patch: int = 4):
        codebook = torch.as_tensor(codebook, dtype=torch.float32)
        if codebook.ndim != 2 or codebook.shape[1] != patch * patch * 3:
            raise ValueError(
                f"codebook must be [N, {patch * patch * 3}] for patch {patch}, got {tuple(codebook.shape)}"
            )
        self.codebook = codebook.contiguous()
        self.patch = int(patch)

    @property
    def n_codes(self) -> int:
        return int(self.codebook.shape[0])

    def encode_batch(self, arr: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> LongTensor [B, H/p, W/p] of nearest codewords."""
        patches = _patchify(np.asarray(arr, dtype=np.uint8), self.patch)  # [B, h, w, D]
        b, h, w, d = patches.shape
        flat = torch.from_numpy(patches.reshape(-1, d).astype(np.float32))
        return _nearest(flat, self.codebook).reshape(b, h, w)

    def encode(self, image) -> torch.Tensor:
        """PIL image or uint8 [H, W, 3] -> LongTensor [H/p, W/p]."""
        return self.encode_batch(_as_uint8(image)[None])[0]

    def decode_array(self, codes) -> np.ndarray:
        """Codes [h, w] (or [B, h, w]) -> uint8 [h*p, w*p, 3] (or [B, ...])."""
        codes = torch.as_tensor(codes, dtype=torch.long).cpu()
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.n_codes):
            lo, hi = int(codes.min()), int(codes.max())
            raise ValueError(f"codes must lie in [0, {self.n_codes}), got [{lo}, {hi}]")
        batched = codes.ndim == 3
        grid = codes if batched else codes[None]  # [B, h, w]
        patches = self.codebook[grid].round().clamp(0, 255).to(torch.uint8).numpy()  # [B, h, w, D]
        out = _unpatchify(patches, self.patch)
        return out if batched else out[0]

    def decode(self, codes):
        """Codes [h, w] -> PIL.Image."""
        from PIL import Image

        return Image.fromarray(np.ascontiguousarray(self.decode_array(codes)))

    def save(self, path: str | Path) -> Path:
        """One safetensors file holding the codebook; the patch size is in its metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"patch": str(self.patch), "kind": "PatchVQ"}
        save_file({"codebook": self.codebook}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PATH) -> PatchVQ:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no shapes VQ at {path}; {MAKE_HINT}")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return cls(load_file(str(path))["codebook"], patch=int(meta.get("patch", 4)))


# ---------------------------------------------------------------------------------------------------
# Fitting


@dataclass(frozen=True)
class FitStats:
    n_patches: int
    n_distinct: int
    inertia: float  # weighted mean squared error per patch after the last iteration (before medoids)


def _distinct_patches(images: np.ndarray, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct patches [U, D] float32 and their counts [U] float32."""
    p = _patchify(np.asarray(images, dtype=np.uint8), patch)
    d = p.shape[-1]
    rows = np.ascontiguousarray(p.reshape(-1, d)).view(np.dtype((np.void, d)))  # one opaque item per patch
    uniq, counts = np.unique(rows, return_counts=True)  # sorted by bytes: deterministic order
    uniq = np.frombuffer(uniq.tobytes(), dtype=np.uint8).reshape(-1, d)
    return torch.from_numpy(uniq.astype(np.float32)), torch.from_numpy(counts.astype(np.float32))


def _kmeans_pp(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Weighted k-means++ seeding: [k, D] rows of x."""
    first = int(torch.multinomial(w, 1, generator=gen))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)  # [U]
    for _ in range(1, k):
        p = w * d2
        if float(p.sum()) <= 0:  # fewer distinct points than codes: repeat
            idx = int(torch.multinomial(w, 1, generator=gen))
        else:
            idx = int(torch.multinomial(p, 1, generator=gen))
        centres.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return torch.stack(centres)


def _medoids(x: torch.Tensor, assign: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Each centre replaced by its nearest member point (a centre with no members is kept)."""
    out = centres.clone()
    d2 = ((x - centres[assign]) ** 2).sum(1)  # [U]
    for j in torch.unique(assign).tolist():
        members = (assign == j).nonzero().squeeze(1)
        out[j] = x[members[d2[members].argmin()]]
    return out


def fit(images: np.ndarray, n_codes: int = DEFAULT_N_CODES, patch: int = 4, seed: int = 0, iters: int = 20,
        medoids: bool = True, return_stats: bool = False):
    """Fit a PatchVQ by weighted k-means over the distinct patches of ``images`` uint8 [B, H, W, 3].

    Deterministic given ``seed`` (k-means++ init from a seeded ``torch.Generator``). With ``medoids``
    each codeword becomes an actual training patch (flat colours survive decoding).
    Returns the PatchVQ, or (PatchVQ, FitStats) with ``return_stats``.
    """
    x, w = _distinct_patches(images, patch)  # [U, D], [U]
    gen = torch.Generator().manual_seed(seed)
    k = min(n_codes, x.shape[0])
    centres = _kmeans_pp(x, w, k, gen)
    assign = _nearest(x, centres)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, assign, x * w[:, None])
        mass = torch.zeros(k).index_add_(0, assign, w)
        keep = mass > 0
        centres[keep] = sums[keep] / mass[keep, None]
        new = _nearest(x, centres)
        if torch.equal(new, assign):
            break
        assign = new
    inertia = float((w * ((x - centres[assign]) ** 2).sum(1)).sum() / w.sum())
    if medoids:
        centres = _medoids(x, assign, centres)
    if k < n_codes:  # pad so that n_codes is what was asked for (extra codes are copies of code 0)
        centres = torch.cat([centres, centres[:1].expand(n_codes - k, -1)])
    vq = PatchVQ(centres, patch)
    stats = FitStats(n_patches=int(w.sum()), n_distinct=int(x.shape[0]), inertia=inertia)
    return (vq, stats) if return_stats else vq
