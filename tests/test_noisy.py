"""SJD2 noise (models/noisy.py) and window level layouts (decode/schedule.py)."""
from __future__ import annotations

import pytest
import torch

from decode.schedule import initial_levels, step_levels
from models.noisy import (
    EmbeddingNorm,
    NoiseConfig,
    ReservedTokenSignal,
    TimestepMLP,
    alpha_sigma,
    denoise_step,
    levels_t,
    make_signal,
    model_input,
    noise_latent,
    noisy_embedding,
)
from models.tiny import TinyConfig, build

CONFIGS = [
    NoiseConfig(),
    NoiseConfig(spacing="uniform", levels=7),
    NoiseConfig(schedule="cosine", levels=10, t_min=0.05),
    NoiseConfig(levels=5, t_max=0.8),
    NoiseConfig(levels=1),
]


@pytest.fixture(scope="module")
def adapter():
    return build(TinyConfig(words=("a",), n_codes=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64), seed=0, image_size=16)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.schedule}-{c.spacing}-K{c.levels}")
def test_levels_endpoints_and_monotone(cfg):
    t = levels_t(cfg)
    assert t.shape == (cfg.levels + 1,)
    assert t[0] == 0.0 and t[1] == pytest.approx(cfg.t_min if cfg.levels > 1 else cfg.t_max)
    assert t[-1] == cfg.t_max
    assert bool((t[1:] > t[:-1]).all()) or cfg.levels == 1
    alpha, sigma = alpha_sigma(t, cfg)
    assert alpha[0] == 1.0 and sigma[0] == 0.0  # clean
    assert bool((alpha[1:] < alpha[:-1]).all()) and bool((sigma[1:] > sigma[:-1]).all())
    if cfg.t_max == 1.0:
        assert alpha[-1] == 0.0 and sigma[-1] == 1.0  # the top level is pure noise


def test_karras_crowds_low_noise():
    t = levels_t(NoiseConfig(levels=25))[1:]
    gaps = t[1:] - t[:-1]
    assert bool((gaps[1:] > gaps[:-1]).all())  # rho = 7: steps grow toward the noisy end
    assert int((t < 0.5).sum()) > 18


def test_bad_configs_name_the_fix():
    with pytest.raises(ValueError, match="t_min > 0"):
        NoiseConfig(t_min=0.0)
    with pytest.raises(ValueError, match="pick one of"):
        NoiseConfig(schedule="edm")


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.schedule}-{c.spacing}-K{c.levels}")
def test_denoising_with_true_x0_reaches_the_truth(cfg):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    K = cfg.levels
    z = noise_latent(x0, K, eps, cfg)
    for k in range(K, 0, -1):
        z = denoise_step(z, x0, k, cfg)
        # DDIM with the true x0 keeps eps: every intermediate latent is the train-time latent of its level
        torch.testing.assert_close(z, noise_latent(x0, k - 1, eps, cfg), atol=1e-5, rtol=1e-5)
    assert torch.equal(z, x0)  # exactly the truth at level 0


def test_denoise_step_per_slot_levels():
    cfg = NoiseConfig(levels=6)
    g = torch.Generator().manual_seed(1)
    x0, z = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    k = torch.tensor([1, 3, 6, 2])
    batched = denoise_step(z, x0, k, cfg)
    for i in range(4):
        torch.testing.assert_close(batched[i], denoise_step(z[i], x0[i], int(k[i]), cfg))
    assert torch.equal(batched[0], x0[0])
    with pytest.raises(ValueError, match="k >= 1"):
        denoise_step(z, x0, torch.tensor([0, 1, 1, 1]), cfg)


def test_denoising_toward_a_wrong_x0_lands_on_it():
    """At level 0 the latent is whatever x0 the last step used (the clean token), not the start."""
    cfg = NoiseConfig(levels=4)
    g = torch.Generator().manual_seed(2)
    z, guess = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    for k in range(4, 0, -1):
        z = denoise_step(z, guess if k == 1 else torch.randn(3, 8, generator=g), k, cfg)
    assert torch.equal(z, guess)


def test_embedding_norm_roundtrip(adapter):
    norm = EmbeddingNorm.from_adapter(adapter)
    codes = adapter.embed(torch.arange(adapter.layout.code_start, adapter.layout.code_stop)[None])[0]
    z = norm.normalize(codes)
    torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(z.shape[-1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(norm.denormalize(z), codes.float(), atol=1e-6, rtol=1e-5)


def test_noisy_embedding_level0_is_exactly_clean_and_noisy_levels_carry_the_signal(adapter):
    cfg = NoiseConfig(levels=5)
    norm, signal = EmbeddingNorm.from_adapter(adapter), ReservedTokenSignal(adapter, cfg)
    ids = torch.arange(adapter.layout.code_start, adapter.layout.code_start + 6)[None]  # [1, 6]
    e = adapter.embed(ids)  # [1, 6, D]
    level = torch.tensor([[0, 1, 2, 3, 4, 5]])
    eps = torch.randn(e.shape, generator=torch.Generator().manual_seed(0))
    out = noisy_embedding(e, level, eps, norm, cfg, signal)
    assert torch.equal(out[0, 0], e[0, 0])
    t = levels_t(cfg).float()
    alpha, sigma = alpha_sigma(t, cfg)
    for k in range(1, 6):
        z = alpha[k] * norm.normalize(e[0, k]) + sigma[k] * eps[0, k]
        expected = norm.denormalize(z) + adapter.embed(torch.tensor([[adapter.reserved_ids[k - 1]]]))[0, 0]
        torch.testing.assert_close(out[0, k], expected, atol=1e-5, rtol=1e-5)
    # level K with t_max = 1 forgets the clean token: same eps, different tokens -> same input
    other = noisy_embedding(adapter.embed(ids.flip(-1)), level, eps, norm, cfg, signal)
    torch.testing.assert_close(out[0, 5], other[0, 5], atol=1e-6, rtol=0)
    assert not torch.allclose(out[0, 1], other[0, 1])


def test_train_time_noising_equals_decode_time_latents(adapter):
    """The decoder's slot (pure noise denoised toward the true token) feeds the model the same numbers
    as the trainer's ``noisy_embedding`` of that token at that level, with the same eps."""
    cfg = NoiseConfig(levels=6)
    norm, signal = EmbeddingNorm.from_adapter(adapter), make_signal(cfg, adapter)
    ids = torch.arange(adapter.layout.code_start, adapter.layout.code_stop)[None]  # [1, 8]
    e = adapter.embed(ids)
    eps = torch.randn(e.shape, generator=torch.Generator().manual_seed(3))
    x0 = norm.normalize(e)
    z = eps.clone()  # a fresh slot: pure noise at level K
    for k in range(cfg.levels, -1, -1):
        level = torch.full(ids.shape, k)
        decode_in = model_input(e, z, level, norm, cfg, signal)
        train_in = noisy_embedding(e, level, eps, norm, cfg, signal)
        torch.testing.assert_close(decode_in, train_in, atol=1e-5, rtol=1e-5)
        if k:
            z = denoise_step(z, x0, k, cfg)


def test_noisy_embedding_is_differentiable(adapter):
    cfg = NoiseConfig(levels=3)
    emb = adapter.backbone.get_input_embeddings()
    emb.weight.grad = None
    ids = torch.tensor([[adapter.layout.code_start, adapter.layout.code_start + 1]])
    out = noisy_embedding(emb(ids), torch.tensor([[0, 2]]), torch.randn(1, 2, 32),
                          EmbeddingNorm.from_adapter(adapter), cfg, ReservedTokenSignal(adapter, cfg))
    out.sum().backward()
    assert emb.weight.grad[adapter.reserved_ids[1]].abs().sum() > 0  # the level-2 signal row learns
    assert emb.weight.grad[adapter.reserved_ids[0]].abs().sum() == 0
    assert emb.weight.grad[ids[0, 0]].abs().sum() > 0
    emb.weight.grad = None


def test_reserved_signal_needs_enough_reserved_ids(adapter):
    with pytest.raises(ValueError, match="reserved ids"):
        ReservedTokenSignal(adapter, NoiseConfig(levels=len(adapter.reserved_ids) + 1))
    ReservedTokenSignal(adapter, NoiseConfig(levels=100, signal_levels=25))  # decode grid != signal grid: fine


def test_reserved_signal_maps_other_grids_to_the_nearest_level(adapter):
    train = NoiseConfig(levels=10)
    sig = ReservedTokenSignal(adapter, NoiseConfig(levels=4, signal_levels=10))
    grid = levels_t(train).float()
    assert sig.level_of(grid[1:]).tolist() == list(range(10))  # on the grid: exact
    mid = (grid[3] * 0.9 + grid[4] * 0.1).reshape(1)
    assert sig.level_of(mid).tolist() == [2]  # nearest level 3 -> index 2


def test_timestep_mlp_starts_at_zero_and_learns():
    cfg = NoiseConfig(levels=4)
    mlp = TimestepMLP(hidden_size=16, freq_dim=8, width=12)
    t = levels_t(cfg).float()
    assert torch.equal(mlp(t), torch.zeros(5, 16))
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    (mlp(t) - 1.0).pow(2).mean().backward()
    opt.step()
    out = mlp(t)
    assert torch.equal(out[0], torch.zeros(16))  # never a signal on clean inputs
    assert out[1:].abs().sum() > 0


def test_make_signal_mlp_needs_the_module(adapter):
    with pytest.raises(ValueError, match="timestep_mlp"):
        make_signal(NoiseConfig(timestep_signal="mlp"), adapter)


@pytest.mark.parametrize("window,K", [(96, 25), (8, 25), (25, 25), (3, 1), (1, 4)])
def test_initial_levels(window, K):
    st = initial_levels(window, K, "staircase")
    assert st.shape == (window,)
    assert bool((st[1:] >= st[:-1]).all())
    assert int(st.min()) >= 1 and int(st[-1]) == K
    if window >= K:  # every level appears
        assert sorted(set(st.tolist())) == list(range(1, K + 1))
    assert initial_levels(window, K, "max").tolist() == [K] * window
    assert step_levels(st).tolist() == [max(v - 1, 0) for v in st.tolist()]
    with pytest.raises(ValueError, match="pick one of"):
        initial_levels(window, K, "pyramid")
