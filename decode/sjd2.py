"""Speculative Jacobi-Denoising Decoding (SJD2; Teng et al., NeurIPS 2025, arXiv 2510.08994).

No reference code is public; DESIGN.md section 5 lists what the paper fixes. Every choice it leaves
open is a keyword option below (and in ``conf/decoder/sjd2.yaml``) with a named default.

Letters as in :mod:`decode.speculative`: p = target (the output row before a slot), q = the
distribution the slot's draft was drawn from; noise letters as in :mod:`models.noisy`.

The window
----------
Like SJD (:mod:`decode.sjd`), ``window`` counts the inputs of a steady-state forward: the newest
committed token + ``window - 1`` *slots*, one per uncommitted position, front first; it opens only
inside ``jacobi_region`` (the head/tail are plain AR) and never reaches the last token. A slot holds

* a noise level (0 = clean, K = ``denoise_steps`` = noisiest) and, when noisy, a latent ``z`` in
  normalised embedding space; its model input is :func:`models.noisy.model_input` -- the same function
  the trainer's noising goes through -- i.e. ``denorm(z) + signal(t_k)``, or the clean embedding of its
  draft at level 0;
* a draft token ``d`` with its q once it has been through a forward (a slot that has not has no draft).

Slots of forced layout positions are clean from the start (draft = forced id, q one-hot). The slots of the
window's first opening (at the start of ``jacobi_region``) get levels from ``init_levels``
(:func:`decode.schedule.initial_levels`); every slot that joins the tail later gets level K (also when a
forward accepted the whole window). Its latent is ``sigma_k * eps`` (``init_latent=
"prior_mean"``: the prior clean estimate x0 = 0, the mean image-code embedding, noised to level k; pure
noise at k = K when t_max = 1) or ``eps`` at any level (``"pure_noise"``).

One iteration (one forward, CFG streams batched)
------------------------------------------------
1. Inputs: the committed tokens without valid KV (clean embeddings; at least the newest), then the
   slot inputs. Output row i-1 is p_i for slot i (the row of the newest committed token for slot 0);
   one fresh token y_i ~ p_i is sampled at every row (``decode.sampling.sample``).
2. Verification: the leading slots that are *eligible* -- they have a draft and, with
   ``accept_only_clean_inputs``, a clean input -- are tested with :func:`decode.speculative.accept`.
   The accepted prefix commits, then the residual sample at the first rejection, or, when every
   eligible slot passes, the fresh sample y_m of the first non-eligible row (slot m, or the bonus row
   after the last slot). Every forward commits >= 1 token. Since y_m ~ p_m exactly, a slot without a
   draft behaves as a draft with q = 0 (always rejected, residual = p).
3. KV: kept for the longest prefix of the committed inputs whose input was the clean embedding of the
   committed token (re-fed committed tokens and accepted slots at level 0); the rest is dropped in every
   stream (the next request's ``drop``) and re-fed clean at the head of the next forward.
4. Window: committed slots leave. Every remaining slot takes its fresh sample y_i as its new draft with
   q = p_i (``draft_q="sampled"``: the distribution y_i was drawn from, as SJD does for its Jacobi
   drafts; ``"one_hot"``: q = one-hot(y_i)). A clean slot is thereby refined as in Jacobi decoding; a
   noisy slot takes one denoising step (:func:`models.noisy.denoise_step`) from level k to k-1 toward
   x0 = the normalised embedding of y_i (``x0="sample"``) or the p_i-weighted mean of the normalised
   image-code embeddings (``x0="expectation"``): the token predicted *for* the slot is the output one
   position earlier (the one-position offset). At level 0 the slot's input becomes the clean embedding of
   its draft. Fresh slots join the tail.

Coupling (``coupling``, :mod:`decode.coupling`): step 4's new draft of every slot that already held one
-- a clean slot's redraft and a noisy slot's x0 sample alike -- is coupled to its old draft (``"maximal"``)
or drawn with the position's persistent Gumbel noise (``"gumbel"``) instead of fresh; its marginal stays
p_i, so the exactness below is kept.

Exactness: with ``accept_only_clean_inputs=True`` every committed token is drawn (accepted or
resampled) from a p whose conditioning inputs are all clean committed tokens, so the output follows
plain AR exactly (greedy: token for token). The default (accept noisy-input slots, as the paper) is lossy.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from decode import coupling as couple
from decode.batch import Forward, Steps, run_one
from decode.result import DecodeResult
from decode.sampling import SamplingConfig, final_probs
from decode.schedule import INIT_MODES, initial_levels
from decode.sjd2_window import Sjd2Window, Slots
from decode.window import (
    REGIONS,
    check_window,
    jacobi_span,
    n_window_drafts,
    open_sequence,
    verify,
)
from models.base import ModelAdapter, Prefill
from models.noisy import NoiseConfig, Sjd2Recipe, levels_t, make_signal

DRAFT_QS = ("sampled", "one_hot")
INIT_LATENTS = ("prior_mean", "pure_noise")


@dataclass
class Sjd2Stats:
    """Counters for ``DecodeResult.extra`` (what the report plots)."""

    n_drafts_tested: int = 0
    n_drafts_accepted: int = 0
    n_noisy_accepted: int = 0  # accepted slots whose input was noisy (impossible with clean-only)
    level_sum_at_accept: float = 0.0
    n_refed_tokens: int = 0  # committed tokens fed again because their KV was not clean
    n_inputs: int = 0  # inputs of every forward after the prefill (re-fed tokens + newest committed + slots)
    n_step_forwards: int = 0  # forwards after the prefill
    accepted_by_slot: list[int] = field(default_factory=list)  # accepts per slot index (0 = front)
    present_by_slot: list[int] = field(default_factory=list)  # forwards in which slot index i existed
    accepted_by_level: list[int] = field(default_factory=list)  # accepts per input level of the slot
    n_redrafts: int = 0  # slots that held a draft and took a new one (step 4)
    _with_k: dict[int, int] = field(default_factory=dict, repr=False)  # forwards per slot count (not yet in present)

    def record(self, levels: list[int], n_tested: int, n_acc: int, K: int) -> None:
        k = len(levels)
        for counts, n in ((self.accepted_by_slot, k), (self.present_by_slot, k), (self.accepted_by_level, K + 1)):
            if len(counts) < n:
                counts.extend([0] * (n - len(counts)))
        self._with_k[k] = self._with_k.get(k, 0) + 1  # present_by_slot[i] += 1 for i < k, summed in as_dict
        acc_levels = levels[:n_acc]
        for i, lv in enumerate(acc_levels):
            self.accepted_by_slot[i] += 1
            self.accepted_by_level[lv] += 1
        self.n_drafts_tested += n_tested
        self.n_drafts_accepted += n_acc
        self.n_noisy_accepted += sum(lv > 0 for lv in acc_levels)
        self.level_sum_at_accept += float(sum(acc_levels))

    def as_dict(self) -> dict[str, Any]:
        present = self.present_by_slot
        for k, n in self._with_k.items():
            for i in range(k):
                present[i] += n
        self._with_k = {}
        out = {k: v for k, v in vars(self).items() if k not in ("level_sum_at_accept", "_with_k")}
        out["mean_level_at_accept"] = self.level_sum_at_accept / max(self.n_drafts_accepted, 1)
        out["mean_inputs_per_forward"] = self.n_inputs / max(self.n_step_forwards, 1)
        return out


def validate_options(window: int, init_levels: str, draft_q: str, init_latent: str, jacobi_region: str,
                     coupling: str = "none", coupled_q: str = "target") -> None:
    """Clear errors for impossible SJD2 settings (noise options are checked by ``NoiseConfig``)."""
    couple.validate(coupling, coupled_q)
    check_window(window, "inputs per forward; 1 = plain AR; the paper uses 96 for Lumina-mGPT, 128 for Emu3")
    for name, value, allowed in (("init_levels", init_levels, INIT_MODES), ("draft_q", draft_q, DRAFT_QS),
                                 ("init_latent", init_latent, INIT_LATENTS), ("jacobi_region", jacobi_region, REGIONS)):
        if value not in allowed:
            raise ValueError(f"decoder.{name} must be one of {list(allowed)}, got {value!r}")


def noise_config(denoise_steps: int, **options: Any) -> NoiseConfig:
    """The decoder's noise options as the one :class:`NoiseConfig` the trainer and the recipe use: the
    decoder's options are flat and name the level count ``denoise_steps`` (= ``NoiseConfig.levels``);
    options that are not noise (window, draft_q, ...) are skipped."""
    known = set(NoiseConfig.__dataclass_fields__) - {"levels"}
    return NoiseConfig(levels=denoise_steps, **{k: v for k, v in options.items() if k in known})


def decoding_noise(adapter: Any, denoise_steps: int, check_trained_noise: bool = True,
                   **options: Any) -> tuple[Sjd2Recipe, NoiseConfig]:
    """(the model's recipe, the noise this decode uses): the decoder's noise options over the recipe's
    level grid (``signal_levels=None``), refused when they differ from training (``check_trained_noise``).
    The decode stage calls it too, before it writes anything."""
    recipe = adapter.trained_recipe() or Sjd2Recipe()
    trained = recipe.noise
    if options.get("signal_levels") is None and trained is not None:  # the grid is the model's, not the decoder's
        options["signal_levels"] = trained.n_signal_levels
    noise = noise_config(denoise_steps, **options)
    if check_trained_noise:
        match_trained_noise(noise, trained)
    return recipe, noise


def match_trained_noise(noise: NoiseConfig, trained: NoiseConfig | None) -> None:
    """Refuse decoding noise that the model was not trained with (no recipe: nothing to check).

    Must match: the schedule, the kind of timestep signal and, for the reserved-token signal, its level
    grid (a different ``denoise_steps`` is fine: ``signal_levels`` = the training levels).
    """
    if trained is None:
        return
    problems = []
    for name in ("schedule", "timestep_signal"):
        if getattr(trained, name) != getattr(noise, name):
            problems.append(f"{name}={getattr(noise, name)!r} but the model was trained with {getattr(trained, name)!r}")
    if not problems and noise.timestep_signal == "reserved_token":
        ours, theirs = levels_t(noise, noise.n_signal_levels), levels_t(trained, trained.n_signal_levels)
        if ours.shape != theirs.shape or not torch.allclose(ours, theirs, atol=1e-9, rtol=0):
            problems.append(
                f"the reserved-token level grid differs from training; set signal_levels={trained.n_signal_levels} "
                f"spacing={trained.spacing} rho={trained.rho} t_min={trained.t_min} t_max={trained.t_max}"
            )
    if problems:
        raise ValueError("sjd2 noise options do not match the model's fine-tuning: " + "; ".join(problems)
                         + " (or set decoder.check_trained_noise=false to decode anyway)")


def redraft(slots: Slots, p: torch.Tensor, fresh: torch.Tensor, rest: slice, coupling: str, coupled_q: str,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Step 4's new drafts of the slots ``rest``: (drafts [r], their q when coupled (None: p), the indices
    into ``rest`` of the slots that held a draft). Fresh samples (SJD2; Gumbel coupling drew them with the
    positions' noise); with maximal coupling a slot that held a draft couples its new one to it."""
    new = fresh[rest]
    had = torch.tensor([i - rest.start for i in range(rest.start, rest.stop) if slots.draft_list[i]],
                       dtype=torch.long, device=new.device)
    if coupling != "maximal" or not had.numel():
        return new, None, had
    rows = had + rest.start
    q_old = slots.q_rows(rest.stop)[rows]
    kept_or_new, kept = couple.maximal_coupling(p[rows], q_old, slots.drafts[rows], generator)
    new, q_new = new.clone(), p[rest].clone()
    new[had] = kept_or_new
    q_new[had] = couple.coupled_q(p[rows], q_old, kept, coupled_q)
    return new, q_new, had


@torch.no_grad()
def sjd2_steps(
    adapter: ModelAdapter,
    prefill: Prefill,
    sampling: SamplingConfig,
    generator: torch.Generator,
    *,
    window: int = 96,
    denoise_steps: int = 25,
    init_levels: str = "staircase",
    init_latent: str = "prior_mean",
    x0: str = "sample",
    draft_q: str = "sampled",
    accept_only_clean_inputs: bool = False,
    coupling: str = "none",
    coupled_q: str = "target",
    timestep_signal: str = "reserved_token",
    signal_levels: int | None = None,
    schedule: str = "rectified_flow",
    spacing: str = "karras",
    rho: float = 7.0,
    t_min: float = 0.01,
    t_max: float = 1.0,
    jacobi_region: str = "image",
    check_trained_noise: bool = True,
    signal: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Steps:
    """The SJD2 step coroutine (:mod:`decode.batch`); options as :func:`sjd2_decode`."""
    validate_options(window, init_levels, draft_q, init_latent, jacobi_region, coupling, coupled_q)
    recipe, noise = decoding_noise(adapter, denoise_steps, check_trained_noise, schedule=schedule, spacing=spacing,
                                   rho=rho, t_min=t_min, t_max=t_max, timestep_signal=timestep_signal,
                                   signal_levels=signal_levels, x0=x0)
    if signal is None:
        signal = make_signal(noise, adapter, mlp=recipe.timestep_mlp)
    win = Sjd2Window(adapter, noise, signal, init_latent, draft_q, recipe.norm)
    layout, K = adapter.layout, noise.levels
    n_tokens, span = layout.n_tokens, jacobi_span(layout, jacobi_region)

    seq, n_streams = yield from open_sequence(adapter, prefill, sampling, generator)  # committed tokens
    drop = 0  # inputs of the last forward whose KV is not kept (dropped before the next one)
    n_committed, n_cached, per_forward = 1, 0, [1]  # n_cached: committed tokens whose KV is in the cache
    slots, stats, opened = win.empty(), Sjd2Stats(), False
    gumbel = couple.GumbelNoise(adapter.vocab_size, seq.device) if coupling == "gumbel" else None
    n_unchanged = torch.zeros((), dtype=torch.long, device=seq.device)  # redrafts that kept their token

    while n_committed < n_tokens:
        # the window: keep the slots that still fit, add fresh ones at the tail
        k = n_window_drafts(n_committed, window, span, n_tokens)
        if len(slots) > k:
            slots = slots.head(k)
        if len(slots) < k:
            n_new = k - len(slots)
            first = not opened  # the window's first opening: init_levels; later slots join the tail at K
            levels = initial_levels(n_new, K, init_levels) if first else n_new
            slots = slots.cat(win.new_slots(n_committed + len(slots), levels, generator))
            opened = True

        # 1. one forward over [uncached committed tokens, slot inputs]
        u = n_committed - n_cached  # >= 1
        inputs = win.inputs(slots, seq[n_cached:n_committed])  # [u + k, D]
        logits = yield Forward(inputs[None].expand(n_streams, -1, -1), drop=drop)
        p = final_probs(logits[:, u - 1 :], range(n_committed, n_committed + k + 1), layout, sampling)

        # 2. verify the eligible prefix, commit
        n_tested = 0  # test up to the first ineligible slot
        for level, has_draft in zip(slots.level_list, slots.draft_list):
            if not has_draft or (accept_only_clean_inputs and level):
                break
            n_tested += 1
        drawn = None if gumbel is None else gumbel.sample(p, n_committed, generator)
        n_acc, committed, fresh = verify(p, slots.q_rows(n_tested), slots.drafts, generator, n_testable=n_tested,
                                         fresh=drawn)
        stats.record(slots.level_list, n_tested, n_acc, K)
        stats.n_refed_tokens += u - 1
        stats.n_inputs += u + k
        stats.n_step_forwards += 1

        # 3. keep the KV of the clean committed inputs (a prefix), roll back the rest
        keep = u + next((i for i, level in enumerate(slots.level_list[:n_acc]) if level), n_acc)
        drop = u + k - keep
        seq[n_committed : n_committed + n_acc + 1] = committed
        n_cached += keep
        n_committed += n_acc + 1
        per_forward.append(n_acc + 1)

        # 4. the remaining slots take their fresh samples as drafts; noisy ones denoise one level
        rest = slice(n_acc + 1, k)
        new, q_new, had = redraft(slots, p, fresh, rest, coupling, coupled_q, generator)
        n_unchanged += (new[had] == slots.drafts[rest][had]).sum()
        stats.n_redrafts += int(had.numel())
        slots = win.advance(slots, new, p[rest], rest, q=q_new)

    extra = {"decoder": "sjd2", "window": window, "init_levels": init_levels, "init_latent": init_latent,
             "draft_q": draft_q, "accept_only_clean_inputs": accept_only_clean_inputs, "coupling": coupling,
             "coupled_q": coupled_q, "n_redrafts_unchanged": int(n_unchanged),
             "jacobi_region": jacobi_region, "check_trained_noise": check_trained_noise,
             "norm_from_recipe": recipe.norm is not None, **{f"noise_{k}": v for k, v in asdict(noise).items()},
             **stats.as_dict()}
    return DecodeResult(tokens=seq.cpu(), n_forwards=len(per_forward), n_tokens=n_tokens,
                        accepted_per_forward=per_forward, extra=extra)


@torch.no_grad()
def sjd2_decode(
    adapter: ModelAdapter,
    prefill: Prefill,
    sampling: SamplingConfig,
    generator: torch.Generator,
    *,
    window: int = 96,
    denoise_steps: int = 25,
    init_levels: str = "staircase",
    init_latent: str = "prior_mean",
    x0: str = "sample",
    draft_q: str = "sampled",
    accept_only_clean_inputs: bool = False,
    coupling: str = "none",
    coupled_q: str = "target",
    timestep_signal: str = "reserved_token",
    signal_levels: int | None = None,
    schedule: str = "rectified_flow",
    spacing: str = "karras",
    rho: float = 7.0,
    t_min: float = 0.01,
    t_max: float = 1.0,
    jacobi_region: str = "image",
    check_trained_noise: bool = True,
    signal: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> DecodeResult:
    """Decode the image sequence with SJD2 (module docstring; options as in ``conf/decoder/sjd2.yaml``).

    The noise options (``denoise_steps`` = levels K, ``schedule``, ``spacing``, ``rho``, ``t_min``,
    ``t_max``, ``timestep_signal``, ``signal_levels``, ``x0``) form a :class:`models.noisy.NoiseConfig` and
    must match the fine-tuning run: with ``check_trained_noise`` a model that carries its recipe
    (``adapter.trained_recipe()``) refuses a mismatch. From a recipe also come the reserved-token level
    grid (``signal_levels=None``: the training levels, so ``denoise_steps`` may be swept), the frozen
    embedding normalisation and a trained timestep MLP. ``signal``: an explicit timestep signal, else
    built from ``timestep_signal``, the adapter and the recipe.
    """
    options = {name: value for name, value in locals().items()
               if name not in ("adapter", "prefill", "sampling", "generator")}
    return run_one(adapter, sjd2_steps(adapter, prefill, sampling, generator, **options))
