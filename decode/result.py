"""What every decoder returns (shared by :mod:`decode.ar`, :mod:`decode.sjd`, :mod:`decode.sjd2`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DecodeResult:
    """One decoded image sequence and the decoder's step statistics.

    tokens: LongTensor [n_tokens] on the CPU, the full image sequence (``models.base`` conventions).
    n_forwards: model forwards spent, prefill included (plain AR: ``layout.n_tokens``).
    accepted_per_forward: tokens committed by each forward, in order (sums to ``n_tokens``).
    extra: decoder-specific statistics and settings (JSON-serialisable values).
    """

    tokens: torch.Tensor
    n_forwards: int
    n_tokens: int
    accepted_per_forward: list[int]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def step_compression(self) -> float:
        """Generated tokens per forward (the papers' "step compression" of one image)."""
        return self.n_tokens / self.n_forwards
