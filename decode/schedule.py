"""Noise-level layouts of the SJD2 inference window (DESIGN.md 5, 5.4).

A window slot at level k (0 = clean, K = noisiest; see :mod:`models.noisy`) holds a latent of that
level. Levels never decrease along the window (front = next token to commit, tail = farthest). Every
forward moves each unaccepted noisy slot one level down (:func:`step_levels`); fresh slots join the
tail at level K. Starting from ``max`` the window therefore settles into a staircase by itself; the
``staircase`` start begins there directly.
"""
from __future__ import annotations

import torch

INIT_MODES = ("staircase", "max")


def initial_levels(window: int, levels: int, mode: str = "staircase") -> torch.Tensor:
    """Levels of a fresh window, LongTensor [window], non-decreasing, each in [1, levels].

    ``staircase``: slot i (0-based) gets ``ceil((i + 1) * K / window)`` — evenly spread levels ending
    at K on the last slot (window 96, K 25: slots 0-3 at level 1, ..., slots 92-95 at level 25; a
    window shorter than K skips levels). ``max``: every slot at K (pure noise when t_max = 1).
    """
    if window < 0 or levels < 1:
        raise ValueError(f"need window >= 0 and levels >= 1, got window={window}, levels={levels}")
    if mode == "max":
        return torch.full((window,), levels, dtype=torch.long)
    if mode == "staircase":
        i = torch.arange(window, dtype=torch.long)
        return torch.clamp(((i + 1) * levels + window - 1) // max(window, 1), 1, levels)  # ceil division
    raise ValueError(f"unknown init_levels {mode!r}; pick one of {INIT_MODES}")


def step_levels(levels: torch.Tensor) -> torch.Tensor:
    """Levels after one denoising step: every noisy slot (level >= 1) one level down, clean slots stay."""
    return (levels - 1).clamp_min(0)
