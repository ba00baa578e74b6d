"""SJD2's window (decode/sjd2_window.py) against the trainer's noise functions: what slots feed the
model at each level, how they denoise, and how forced positions and x0 estimates behave."""
from __future__ import annotations

import pytest
import torch

from decode.sjd2 import Sjd2Window
from models.noisy import NoiseConfig, make_signal, noisy_embedding
from models.tiny import build
from tests.conftest import micro_config, reinit


@pytest.fixture(scope="module")
def adapter():
    """The micro model of tests/test_sjd2.py: 4x4 codes + EOLs, 8 codes, re-drawn (peaked) weights."""
    return reinit(build(micro_config(n_codes=8), seed=0, image_size=16))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("schedule", ["rectified_flow", "cosine"])
def test_window_slots_are_fed_the_trainers_noisy_embeddings(adapter, schedule):
    """A fresh slot (pure noise at level K) denoised toward its true token feeds the model, level by
    level, exactly what the trainer's ``noisy_embedding`` gives for that token, level and eps."""
    noise = NoiseConfig(levels=4, schedule=schedule)
    win = Sjd2Window(adapter, noise, make_signal(noise, adapter), init_latent="prior_mean", draft_q="sampled")
    start = len(adapter.layout.head)  # first code row: positions start..start+3 are free codes
    g = gen(0)
    slots = win.new_slots(start, torch.full((4,), noise.levels), g)
    eps = torch.randn(4, win.dim, generator=gen(0))  # the same draw new_slots made
    truth = torch.arange(adapter.layout.code_start, adapter.layout.code_start + 4)
    clean = adapter.embed(truth[None])[0]
    p = torch.zeros(4, adapter.vocab_size).index_put_((torch.arange(4), truth), torch.tensor(1.0))
    for k in range(noise.levels, -1, -1):
        assert slots.levels.tolist() == [k] * 4
        expected = noisy_embedding(clean, torch.full((4,), k), eps, win.norm, noise, win.signal)
        torch.testing.assert_close(win.inputs(slots), expected, atol=1e-5, rtol=1e-5)
        slots = win.advance(slots, truth, p)
    assert torch.equal(win.inputs(slots), clean) and slots.drafts.tolist() == truth.tolist()


def test_expectation_x0_of_a_one_hot_p_is_the_sampled_token(adapter):
    sample_win, mean_win = (Sjd2Window(adapter, NoiseConfig(levels=3, x0=x0),
                                       make_signal(NoiseConfig(levels=3), adapter), "prior_mean", "sampled")
                            for x0 in ("sample", "expectation"))
    tokens = torch.tensor([adapter.layout.code_start + 1, adapter.layout.code_start + 5])
    one_hot = torch.zeros(2, adapter.vocab_size).index_put_((torch.arange(2), tokens), torch.tensor(1.0))
    torch.testing.assert_close(mean_win.clean_estimate(tokens, one_hot), sample_win.clean_estimate(tokens, one_hot))
    uniform = adapter.layout.code_mask(adapter.vocab_size).float()[None] / adapter.layout.n_codes
    torch.testing.assert_close(mean_win.clean_estimate(tokens[:1], uniform), torch.zeros(1, mean_win.dim),
                               atol=1e-5, rtol=0)  # the mean code embedding is 0 in normalised space


def test_forced_positions_are_clean_slots_of_the_forced_id(adapter):
    noise = NoiseConfig(levels=5)
    win = Sjd2Window(adapter, noise, make_signal(noise, adapter), "prior_mean", "sampled")
    layout = adapter.layout
    slots = win.new_slots(0, torch.full((layout.n_tokens,), 5), gen(0))
    forced = layout.forced_ids(torch.arange(layout.n_tokens))
    is_forced = forced >= 0
    assert slots.levels[is_forced].eq(0).all() and slots.levels[~is_forced].eq(5).all()
    assert slots.drafts[is_forced].tolist() == forced[is_forced].tolist() and slots.has_draft.tolist() == is_forced.tolist()
    torch.testing.assert_close(win.inputs(slots)[is_forced], adapter.embed(forced[is_forced][None])[0])


@pytest.mark.parametrize("signal_kind", ["reserved_token", "none", "mlp"])
@pytest.mark.parametrize("schedule", ["rectified_flow", "cosine"])
def test_window_inputs_and_denoising_are_the_noise_functions_bit_for_bit(adapter, signal_kind, schedule):
    """The window's per-level tables (built once per image) feed and denoise slots at mixed levels with
    exactly the values of ``model_input`` and ``denoise_step``."""
    from decode.schedule import initial_levels
    from models.noisy import TimestepMLP, denoise_step, model_input

    noise = NoiseConfig(levels=5, schedule=schedule, timestep_signal=signal_kind)
    mlp = None
    if signal_kind == "mlp":
        mlp = TimestepMLP(int(adapter.embedding_stats()[0].numel()))
        torch.nn.init.normal_(mlp.net[-1].weight, std=0.02, generator=gen(1))
    signal = make_signal(noise, adapter, mlp=mlp)
    win = Sjd2Window(adapter, noise, signal, init_latent="prior_mean", draft_q="sampled")
    layout = adapter.layout
    with torch.no_grad():
        slots = win.new_slots(1, initial_levels(layout.n_tokens - 2, noise.levels), gen(2))  # forced and free slots
        for step in range(noise.levels + 1):
            expected = model_input(adapter.embed(slots.drafts[None])[0], slots.z, slots.levels, win.norm, noise, signal)
            assert torch.equal(win.inputs(slots), expected), step
            fresh = torch.randint(layout.code_start, layout.code_stop, (len(slots),), generator=gen(step))
            noisy = slots.levels > 0
            x0 = win.norm.normalize(adapter.embed(fresh[noisy][None])[0])
            z = denoise_step(slots.z[noisy], x0, slots.levels[noisy], noise) if bool(noisy.any()) else None
            levels = slots.levels.tolist()
            slots = win.advance(slots, fresh, torch.zeros(len(slots), adapter.vocab_size))
            assert slots.level_list == slots.levels.tolist() == [max(v - 1, 0) for v in levels]
            assert z is None or torch.equal(slots.z[noisy], z), step
