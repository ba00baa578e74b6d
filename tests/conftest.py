"""Shared fixtures: micro models built in code (no weights, seconds to build) and test adapters."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from models.tiny import TinyAdapter, TinyConfig, build

WORDS = ("a", "red", "blue", "circle", "square", "left", "of")


def micro_config(n_codes: int, hidden_size: int = 64, num_hidden_layers: int = 2) -> TinyConfig:
    """A tiny-family config small enough to decode an image in milliseconds on one CPU core."""
    return TinyConfig(words=WORDS, n_codes=n_codes, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                      num_attention_heads=4, intermediate_size=2 * hidden_size, max_position_embeddings=128)


def reinit(adapter: TinyAdapter, scale: float = 0.5, seed: int = 1) -> TinyAdapter:
    """Redraw every matrix with std ``scale / sqrt(fan_in)``: peaked, context-dependent distributions
    (the default 0.02 init gives near-uniform, near-bigram ones that give statistical tests no power)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, scale / param.shape[1] ** 0.5, generator=gen)
    return adapter


@pytest.fixture(scope="session")
def tiny_random() -> TinyAdapter:
    """Randomly initialised tiny model: 4x4 codes (image 16 px, patch 4) + EOLs, 8 codes, 25 image tokens."""
    return build(micro_config(n_codes=8), seed=0, image_size=16)


@pytest.fixture(scope="session")
def tiny_trained() -> TinyAdapter:
    """The committed, trained ``tiny`` model (models/weights/tiny)."""
    from models.tiny import DEFAULT_PATH, load

    return load(DEFAULT_PATH)


@pytest.fixture(scope="session")
def tiny_sjd2_trained() -> TinyAdapter:
    """The committed SJD2 fine-tuned ``tiny_sjd2`` model (models/weights/tiny_sjd2)."""
    from models.tiny import load

    return load("models/weights/tiny_sjd2", name="tiny_sjd2")


@pytest.fixture(scope="session")
def toy_model() -> TinyAdapter:
    """Enumerable toy: 2x2 codes of 3 kinds (81 image sequences of 11 tokens), 1 layer, peaked distributions."""
    return reinit(build(micro_config(n_codes=3, hidden_size=32, num_hidden_layers=1), seed=0, image_size=8))


class RecomputeChecked:
    """Adapter wrapper asserting that every cached forward equals a full recompute without cache.

    The cache it hands out is ``(inner cache, every input embedding so far [B, T, D])``; rollback trims
    both. Any decoder bug in cache rollback, attention-mask bookkeeping or CFG stream handling makes
    a forward disagree with the recompute of the same inputs.
    """

    def __init__(self, inner: Any, atol: float = 1e-4):
        self.inner, self.atol = inner, atol
        self.layout, self.vocab_size, self.device = inner.layout, inner.vocab_size, inner.device
        self.n_forwards = 0

    def prompt(self, text: str, cfg: bool = True):
        return self.inner.prompt(text, cfg=cfg)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed(ids)

    def forward(self, inputs_embeds: torch.Tensor, cache: Any, attention_mask: torch.Tensor):
        inner_cache, history = cache if cache is not None else (None, inputs_embeds[:, :0])
        history = torch.cat([history, inputs_embeds], dim=1)  # [B, T, D]
        assert attention_mask.shape == history.shape[:2], "attention mask out of step with the cache"
        logits, inner_cache = self.inner.forward(inputs_embeds, inner_cache, attention_mask)
        full, _ = self.inner.forward(history, None, attention_mask)
        torch.testing.assert_close(logits, full[:, -inputs_embeds.shape[1]:], atol=self.atol, rtol=1e-4)
        assert inner_cache.get_seq_length() == history.shape[1], "cache holds other entries than the inputs"
        self.n_forwards += 1
        return logits, (inner_cache, history)

    def rollback(self, cache: Any, n: int) -> Any:
        inner_cache, history = cache
        return self.inner.rollback(inner_cache, n), history[:, : history.shape[1] - n]
