"""The SJD2 training noise layout (train/noising.py): monotone levels, clean share, labels, prompt dropout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, chisquare

from models.base import FREE
from models.tiny import BOS, WORD_BASE
from tests.conftest import micro_config
from train.noising import IGNORE, NoiseLayoutConfig, example_rng, make_batch, sample_levels, unconditional_ids

K = 6  # noise levels in these tests


@pytest.fixture(scope="module")
def adapter():
    from models.tiny import build

    return build(micro_config(n_codes=8, hidden_size=32, num_hidden_layers=1), seed=0, image_size=16)


def records(adapter, n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """Random code grids under prompts of 1..3 words (so rows need left padding)."""
    g = torch.Generator().manual_seed(seed)
    lay = adapter.layout
    out = []
    for i in range(n):
        grid = torch.randint(lay.code_start, lay.code_stop, (lay.height, lay.width), generator=g)
        prompt = [BOS] + [WORD_BASE + int(w) for w in torch.randint(0, 7, (1 + i % 3,), generator=g)]
        out.append((prompt + lay.sequence(grid).tolist(), len(prompt)))
    return out


def batch(adapter, recs, cfg: NoiseLayoutConfig, epoch: int = 0, seed: int = 0, first: int = 0):
    keys = [(epoch, first + i) for i in range(len(recs))]
    return make_batch(recs, keys, adapter.layout, unconditional_ids(adapter), 0, cfg, K, seed)


def test_levels_never_decrease_along_the_noised_positions_and_forced_tokens_stay_clean(adapter):
    recs = records(adapter, 64)
    b = batch(adapter, recs, NoiseLayoutConfig(clean_share=0.0, span_max=12, segments_max=4, prompt_dropout=0.0))
    lay = adapter.layout
    forced = lay.forced_ids(torch.arange(lay.n_tokens)) != FREE  # [n_img]
    img_levels = b.levels[:, b.image_start:]  # [B, n_img]
    assert (b.levels[:, : b.image_start] == 0).all(), "prompt or padding noised"
    assert (img_levels[:, forced] == 0).all(), "a forced head/EOL/tail token was noised"
    code_levels = img_levels[:, ~forced]  # [B, H*W] in sequence order
    for row in code_levels:
        noised = (row > 0).nonzero().flatten()
        assert len(noised) >= 1  # clean_share = 0: every row is noised somewhere
        assert (noised.diff() == 1).all(), "the noisy span is not contiguous in image codes"
        assert 1 <= len(noised) <= 12
        vals = row[noised]
        assert (vals.diff() >= 0).all(), f"levels decrease along the sequence: {vals.tolist()}"
        assert len(vals.unique()) <= 4 and int(vals.max()) <= K


def test_segment_levels_cover_every_level_uniformly():
    """Segment levels are uniform over 1..K before sorting: pooled counts pass a chi-square test."""
    cfg = NoiseLayoutConfig(clean_share=0.0, span_min=1, span_max=1, segments_max=1)
    draws = [int(sample_levels(16, cfg, K, example_rng(3, 0, i)).max()) for i in range(3000)]
    counts = np.bincount(draws, minlength=K + 1)[1:]
    assert chisquare(counts).pvalue > 1e-3, counts


def test_clean_share_is_respected(adapter):
    cfg = NoiseLayoutConfig(clean_share=0.3, span_max=8)
    n = 2000
    clean = sum(int(not sample_levels(16, cfg, K, example_rng(5, 0, i)).any()) for i in range(n))
    assert binomtest(clean, n, 0.3).pvalue > 1e-3, clean / n
    all_clean = batch(adapter, records(adapter, 8), NoiseLayoutConfig(clean_share=1.0))
    assert (all_clean.levels == 0).all()


def test_span_length_stays_within_bounds_and_clips_to_the_image():
    cfg = NoiseLayoutConfig(clean_share=0.0, span_min=5, span_max=500)
    lengths = [int((sample_levels(16, cfg, K, example_rng(1, 0, i)) > 0).sum()) for i in range(300)]
    assert min(lengths) >= 5 and max(lengths) <= 16 and 16 in lengths


def test_labels_are_the_next_clean_token_whatever_the_noise(adapter):
    recs = records(adapter, 16)
    noisy = batch(adapter, recs, NoiseLayoutConfig(clean_share=0.0, prompt_dropout=0.0))
    clean = batch(adapter, recs, NoiseLayoutConfig(clean_share=1.0, prompt_dropout=0.0))
    assert torch.equal(noisy.labels, clean.labels) and torch.equal(noisy.input_ids, clean.input_ids)
    has = noisy.labels != IGNORE
    nxt = torch.cat([noisy.input_ids[:, 1:], torch.zeros_like(noisy.input_ids[:, :1])], dim=1)
    assert torch.equal(noisy.labels[has], nxt[has])
    lay = adapter.layout
    # loss_on=codes: exactly the H*W code targets per row, all image codes
    assert int(has.sum()) == 16 * lay.height * lay.width
    assert ((noisy.labels[has] >= lay.code_start) & (noisy.labels[has] < lay.code_stop)).all()
    # each row's image tokens are its record's, after left padding
    for r, (ids, p_len) in enumerate(recs):
        assert noisy.input_ids[r, noisy.image_start:].tolist() == ids[p_len:]
        assert noisy.attention_mask[r].sum() == len(ids)


def test_loss_on_image_counts_every_image_token(adapter):
    b = batch(adapter, records(adapter, 4), NoiseLayoutConfig(loss_on="image", prompt_dropout=0.0))
    assert int((b.labels != IGNORE).sum()) == 4 * adapter.layout.n_tokens
    assert (b.labels[:, : b.image_start - 1] == IGNORE).all()


def test_prompt_dropout_replaces_the_prompt_by_the_unconditional_context(adapter):
    recs = records(adapter, 400)
    b = batch(adapter, recs, NoiseLayoutConfig(prompt_dropout=0.25))
    uncond = unconditional_ids(adapter)
    assert uncond == [BOS]
    dropped = 0
    for r, (ids, p_len) in enumerate(recs):
        prompt = b.input_ids[r, : b.image_start][b.attention_mask[r, : b.image_start].bool()].tolist()
        assert prompt in (ids[:p_len], uncond)
        dropped += prompt == uncond and ids[:p_len] != uncond
        assert b.input_ids[r, b.image_start:].tolist() == ids[p_len:]
    assert binomtest(dropped, len(recs), 0.25).pvalue > 1e-3, dropped


def test_a_row_depends_only_on_its_key_not_on_its_batch(adapter):
    """World-size independence: the same (epoch, index) gives the same row in any batch, any position."""
    recs = records(adapter, 6)
    cfg = NoiseLayoutConfig(clean_share=0.0)
    keys = [(2, i) for i in range(6)]
    whole = make_batch(recs, keys, adapter.layout, [BOS], 0, cfg, K, 7)
    part = make_batch(recs[3:5], keys[3:5], adapter.layout, [BOS], 0, cfg, K, 7)
    shift = whole.image_start - part.image_start
    assert torch.equal(whole.levels[3:5, whole.image_start:], part.levels[:, part.image_start:])
    assert torch.equal(whole.noise_seeds[3:5], part.noise_seeds) and shift >= 0
    other_epoch = make_batch(recs, [(3, i) for i in range(6)], adapter.layout, [BOS], 0, cfg, K, 7)
    assert not torch.equal(other_epoch.levels, whole.levels)


def test_wrong_image_length_and_bad_options_are_refused(adapter):
    ids, p_len = records(adapter, 1)[0]
    with pytest.raises(ValueError, match="re-tokenise"):
        make_batch([(ids[:-1], p_len)], [(0, 0)], adapter.layout, [BOS], 0, NoiseLayoutConfig(), K, 0)
    with pytest.raises(ValueError, match="clean_share"):
        NoiseLayoutConfig(clean_share=1.5)
    with pytest.raises(ValueError, match="span_min"):
        NoiseLayoutConfig(span_min=4, span_max=2)
    with pytest.raises(ValueError, match="loss_on"):
        NoiseLayoutConfig(loss_on="all")
