"""SJD2 fine-tuning levers (issue 11): ``loss_after_span`` of the noise layout, the proxy's KL helpers."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.test_noising import K, batch, records
from train.noising import IGNORE, NoiseLayoutConfig


@pytest.fixture(scope="module")
def adapter():
    from models.tiny import build
    from tests.conftest import micro_config

    return build(micro_config(n_codes=8, hidden_size=32, num_hidden_layers=1), seed=0, image_size=16)


def test_loss_after_span_false_drops_exactly_the_targets_after_the_last_noisy_input(adapter):
    recs = records(adapter, 48)
    on = NoiseLayoutConfig(clean_share=0.3, span_max=12, segments_max=3, prompt_dropout=0.0)
    a, b = batch(adapter, recs, on), batch(adapter, recs, replace(on, loss_after_span=False))
    assert torch.equal(a.levels, b.levels) and torch.equal(a.input_ids, b.input_ids)  # same layout, same draws
    n_noisy_rows = 0
    for r in range(len(recs)):
        noisy = (a.levels[r] > 0).nonzero().flatten()
        if noisy.numel() == 0:  # a clean row keeps every target
            assert torch.equal(a.labels[r], b.labels[r])
            continue
        n_noisy_rows += 1
        last = int(noisy[-1])
        assert torch.equal(a.labels[r, : last + 1], b.labels[r, : last + 1]), "a slot or the clean prefix lost its loss"
        assert (b.labels[r, last + 1 :] == IGNORE).all()
    assert 0 < n_noisy_rows < len(recs)
    assert int((b.labels != IGNORE).sum()) < int((a.labels != IGNORE).sum()), "nothing was dropped"


def test_default_keeps_the_loss_after_the_span():
    assert NoiseLayoutConfig().loss_after_span is True


def test_kl_rows_is_zero_on_itself_and_positive_otherwise():
    from bench.sjd2_levers import cfg_logits, kl_rows

    p = torch.randn(5, K)
    assert torch.allclose(kl_rows(p, p), torch.zeros(5), atol=1e-6)
    assert (kl_rows(p, p + torch.randn(5, K)) > 0).all()
    assert torch.equal(cfg_logits(p, p, 3.0), p)  # equal rows: guidance changes nothing


def test_distill_term_is_zero_at_the_start_grows_when_the_model_moves_and_the_teacher_stays_frozen():
    from tests.test_train import fixed_batch, micro, module_for
    from train.objective import ObjectiveConfig

    adapter = micro()
    plain = module_for(adapter)
    assert plain._teacher == [] and "distill" not in plain(*_args(fixed_batch(adapter, 6, clean_share=0.3)))
    m = module_for(micro(), ObjectiveConfig(distill=1.0))
    b = fixed_batch(m.adapter, 6, clean_share=0.3)
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params == sum(p.numel() for p in plain.parameters()), "the teacher leaked into parameters()"
    assert set(m.state_dict()) == set(plain.state_dict())
    out = m(*_args(b))
    assert float(out["distill"]) == pytest.approx(0.0, abs=1e-6)  # student == teacher
    with torch.no_grad():
        for p in m.lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = m(*_args(b))
    assert float(out["distill"]) > 1e-4
    assert float(out["loss"]) == pytest.approx(float(out["ce"] + out["z_loss"] + out["distill"]), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for p in m._teacher[0].parameters())


def _args(b):
    return b.input_ids, b.attention_mask, b.labels, b.levels, b.noise_seeds


def _full_logp(lm, b, keep):
    with torch.no_grad():
        return torch.log_softmax(lm(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()[keep], -1)


def test_distill_cfg_adds_the_kl_of_the_guided_distributions_computed_from_a_separately_built_unconditional_batch():
    """Reference: the unconditional rows built by make_batch (prompt_dropout=1: the same images after the
    adapter's unconditional ids, left-padded its own way), full HF forwards, guidance by hand."""
    from tests.test_noising import records as recs_of
    from tests.test_train import micro, module_for
    from train.noising import make_batch, unconditional_ids
    from train.objective import ObjectiveConfig

    scale = 3.0
    m = module_for(micro(), ObjectiveConfig(distill=1.0, distill_cfg=scale))
    ad = m.adapter
    recs = recs_of(ad, 6)
    keys = [(0, i) for i in range(6)]
    lay = NoiseLayoutConfig(clean_share=1.0, span_max=8, prompt_dropout=0.0)  # every position has clean history
    b = make_batch(recs, keys, ad.layout, unconditional_ids(ad), 0, lay, K, 0)
    bu = make_batch(recs, keys, ad.layout, unconditional_ids(ad), 0, replace(lay, prompt_dropout=1.0), K, 0)
    args = (*_args(b), b.image_start)
    assert float(m(*args)["distill"]) == pytest.approx(0.0, abs=1e-6)  # student == teacher
    with pytest.raises(ValueError, match="image_start"):
        m(*_args(b))
    with torch.no_grad():
        for p in m.lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = float(m(*args)["distill"])
    teacher = m._teacher[0]
    keep, keep_u = b.labels != IGNORE, bu.labels != IGNORE
    tc, sc = _full_logp(teacher, b, keep), _full_logp(m.lm, b, keep)
    tu, su = _full_logp(teacher, bu, keep_u), _full_logp(m.lm, bu, keep_u)

    def kl(p, q):
        return float((p.exp() * (p - q)).sum(-1).mean())

    def guided(c, u):
        return torch.log_softmax(u + scale * (c - u), -1)

    plain = kl(tc, sc)
    want = plain + kl(guided(tc, tu), guided(sc, su))
    assert got == pytest.approx(want, rel=1e-3)
    assert got > plain * 1.5, "the guided term should weigh the drift more than the plain KL"
    m(*args)["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_cfg_needs_a_distill_weight():
    from train.objective import ObjectiveConfig

    with pytest.raises(ValueError, match="distill_cfg needs"):
        ObjectiveConfig(distill_cfg=3.0)


def test_distill_runs_the_same_modules_when_no_position_has_a_clean_history():
    """ZeRO-3 needs every rank to run the same partitioned modules: no data-dependent shortcut, a zero term."""
    from tests.test_train import fixed_batch, micro, module_for
    from train.objective import ObjectiveConfig

    m = module_for(micro(), ObjectiveConfig(distill=1.0, distill_cfg=3.0))
    b = fixed_batch(m.adapter, 4, clean_share=0.0)
    levels = b.levels.clone()
    levels[:, : b.image_start + 1] = 0
    levels[:, b.image_start] = 1  # the first image input of every row is noisy: no loss position has a clean history
    calls = []
    m.lm.get_submodule(m._backbone).register_forward_hook(lambda *a: calls.append(1))
    out = m(b.input_ids, b.attention_mask, b.labels, levels, b.noise_seeds, image_start=b.image_start)
    assert float(out["distill"]) == 0.0 and torch.isfinite(out["loss"])
    assert len(calls) == 2, "the model's unconditional forward was skipped"
