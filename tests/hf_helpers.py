"""Helpers the Hugging Face adapter tests (Lumina-mGPT, Emu3) share: tiny random configs, a forward
counter, AR decode with the papers' settings, and the windowed-forward + rollback check."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def random_config(cls: type, sizes: Any, keys: Mapping[str, Any]) -> Any:
    """A ``random_init`` config of ``cls`` with ``sizes`` (float32, no checkpoint path); ``keys`` overrides."""
    return cls(**{"path": None, "dtype": "float32", "random_init": True, "random_sizes": sizes, **keys})


class CountingAdapter:
    """Forwards every attribute to the adapter and counts model forwards."""

    def __init__(self, inner):
        self.inner, self.n_forwards = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, *args, **kwargs):
        self.n_forwards += 1
        return self.inner.forward(*args, **kwargs)


def ar_decode_counts(adapter) -> tuple[int, Any]:
    """AR decode of "a red circle" (CFG 3, top-k 2000, seed 0) -> (model forwards spent, the result)."""
    from decode.ar import ar_decode
    from decode.sampling import SamplingConfig

    counting = CountingAdapter(adapter)
    result = ar_decode(counting, adapter.prompt("a red circle"), SamplingConfig(cfg_scale=3.0, top_k=2000),
                       torch.Generator().manual_seed(0))
    return counting.n_forwards, result


def window_rollback_matches_full(adapter, text: str, n_after: int = 12, atol: float = 1e-4) -> None:
    """Prefill, a window of 4, a window of 2 right + 3 rejected drafts rolled back, then the rest: every
    logit equals the full recompute's, both CFG streams, no NaN."""
    pf = adapter.prompt(text, cfg=True)
    t = pf.input_ids.shape[1]
    lay = adapter.layout
    g = torch.Generator().manual_seed(0)
    after = torch.randint(lay.code_start, lay.code_stop, (n_after,), generator=g)
    full_ids = torch.cat([pf.input_ids, after.expand(2, -1)], 1)  # [2, T + N]
    full_mask = torch.cat([pf.attention_mask, torch.ones(2, n_after, dtype=torch.long)], 1)
    ref, _ = adapter.forward(adapter.embed(full_ids), None, full_mask)  # [2, T + N, V]
    assert torch.isfinite(ref).all()

    logits, cache = adapter.forward(adapter.embed(pf.input_ids), None, pf.attention_mask)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[:, -1], ref[:, t - 1], atol=atol, rtol=0)
    mask, done = pf.attention_mask, 0

    def feed(ids: torch.Tensor):
        nonlocal mask, cache
        mask = torch.cat([mask, torch.ones(2, ids.numel(), dtype=torch.long)], 1)
        out, cache = adapter.forward(adapter.embed(ids.expand(2, -1)), cache, mask)
        assert torch.isfinite(out).all()
        return out

    out = feed(after[:4])  # a window of 4 committed tokens
    torch.testing.assert_close(out, ref[:, t : t + 4], atol=atol, rtol=0)
    wrong = torch.randint(lay.code_start, lay.code_stop, (3,), generator=g)
    out = feed(torch.cat([after[4:6], wrong]))  # 2 right, 3 rejected drafts
    torch.testing.assert_close(out[:, :2], ref[:, t + 4 : t + 6], atol=atol, rtol=0)
    cache = adapter.rollback(cache, 3)
    mask = mask[:, :-3]
    assert cache.get_seq_length() == t + 6
    out = feed(after[6:])
    torch.testing.assert_close(out, ref[:, t + 6 :], atol=atol, rtol=0)
    done = t + n_after
    assert cache.get_seq_length() == done


def attention_implementations_agree(adapter, attn: str) -> None:
    """:func:`window_rollback_matches_full` under attention implementation ``attn`` (then back to sdpa)."""
    adapter.model.set_attn_implementation(attn)
    try:
        window_rollback_matches_full(adapter, "a red circle left of a blue square")
    finally:
        adapter.model.set_attn_implementation("sdpa")
