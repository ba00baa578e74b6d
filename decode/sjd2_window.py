"""The SJD2 window's state while decoding one image (:mod:`decode.sjd2` runs the iteration over it).

:class:`Slots` are the uncommitted window slots; :class:`Sjd2Window` holds what does not change during one
image and builds, feeds and advances slots; :class:`LevelTables` are the per-level constants of
:mod:`models.noisy` gathered once, so a window of slots costs one lookup per quantity and forward.
Everything here computes exactly what :func:`models.noisy.model_input` and
:func:`models.noisy.denoise_step` compute (bit for bit); decisions read host-side copies, so a forward
needs no device round trip beyond the acceptance test.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from decode.sampling import forced_ids
from decode.window import one_hot
from models.base import FREE, ModelAdapter
from models.noisy import (
    EmbeddingNorm,
    NoiseConfig,
    NoSignal,
    ReservedTokenSignal,
    TimestepSignal,
    alpha_sigma,
    denoise_step,
    levels_t,
    levels_t_float,
    step_coefficients,
)


class LevelTables:
    """Everything :func:`models.noisy.model_input` and :func:`models.noisy.denoise_step` look up per noise
    level, built once per image, so a window of slots at levels ``[k]`` costs one index per quantity.

    Rows are indexed by level 0..K: ``sigma`` [K+1, 1], ``coef`` [K+1, 2, 1] (``denoise_step``'s c_z and
    c_x, 0 at level 0), ``clean`` [K+1, 1] bool (level 0), ``down`` [K+1] (the level after one
    step, clean stays clean) and, for a signal that is a per-level lookup (reserved token, none),
    ``signal_rows`` [K+1, D] = ``signal(t_k)``; another signal (the MLP) is evaluated per call, as in
    ``model_input``. Every value equals what those functions compute, bit for bit.
    """

    def __init__(self, cfg: NoiseConfig, norm: EmbeddingNorm, signal: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device | str):
        self.cfg, self.signal = cfg, signal
        self.mean, self.std = norm.mean.to(device), norm.std.to(device)
        self.t = levels_t_float(cfg, device)  # [K+1]
        _, sigma = alpha_sigma(levels_t(cfg), cfg)
        self.sigma = sigma.float().to(device)[:, None]
        self.coef = torch.stack(step_coefficients(cfg, device), dim=1)[:, :, None]  # [K+1, 2, 1]
        levels = torch.arange(cfg.levels + 1, device=device)
        self.clean, self.down = (levels == 0)[:, None], (levels - 1).clamp_min(0)
        exact = isinstance(signal, (ReservedTokenSignal, NoSignal))  # row-wise lookups: a table is exact
        with torch.no_grad():
            self.signal_rows = signal(self.t).to(device).float() if exact else None

    def write_inputs(self, emb: torch.Tensor, z: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """``model_input`` in place (decoding: no gradients): ``emb`` [k, D] holds the clean embeddings and
        becomes the model input (``denorm(z) + signal(t_level)`` where level > 0). z [k, D] float32, level [k]."""
        if self.signal_rows is not None:
            sig = self.signal_rows[level]
        else:
            sig = self.signal(self.t[level]).to(emb.device)
        noisy = (z * self.std + self.mean) + sig  # == norm.denormalize(z) + signal(t)
        if noisy.requires_grad:  # (called outside no_grad; ``emb`` must not require grad either)
            noisy = noisy.detach()
        return torch.where(self.clean[level], emb, noisy.to(emb.dtype), out=emb)

    def normalize(self, e: torch.Tensor) -> torch.Tensor:
        """== ``EmbeddingNorm.normalize``."""
        return ((e if e.dtype == torch.float32 else e.float()) - self.mean) / self.std

    def denoise(self, z: torch.Tensor, x0: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """``denoise_step`` of every row at once; rows at level 0 come back as 0 (no step applies)."""
        coef = self.coef[level]  # [k, 2, 1]: c_z, c_x
        return coef[:, 0] * z + coef[:, 1] * x0


@dataclass
class Slots:
    """The uncommitted window slots, front first (k slots). Tensors live on the model's device; the levels
    and which slots hold a draft are also kept on the host (``level_list``, ``draft_list``): every decision
    of the loop reads those, so it needs no device round trip."""

    levels: torch.Tensor  # [k] long, 0 = clean
    z: torch.Tensor  # [k, D] float32 normalised latents (used where levels > 0)
    drafts: torch.Tensor  # [k] long (meaningful where a draft is held)
    q: torch.Tensor  # [h, V], h <= k: draft distributions of the first h slots; slots h.. hold their first
    #                  draft (a forced id, or none) with a one-hot q, built only when tested (q_rows)
    level_list: list[int]  # == levels.tolist()
    draft_list: list[bool]  # has the slot a draft (been through a forward, or forced)?

    @property
    def has_draft(self) -> torch.Tensor:
        """[k] bool on the model's device (from ``draft_list``)."""
        return torch.tensor(self.draft_list, dtype=torch.bool, device=self.levels.device)

    def __len__(self) -> int:
        return len(self.level_list)

    def q_rows(self, n: int) -> torch.Tensor:
        """The draft distributions of (at least) the first n slots: [>= n, V] float32."""
        h = self.q.shape[0]
        return self.q if n <= h else torch.cat([self.q, one_hot(self.drafts[h:], self.q.shape[1])])

    def head(self, n: int) -> Slots:
        """The first n slots."""
        return Slots(self.levels[:n], self.z[:n], self.drafts[:n], self.q[:n], self.level_list[:n],
                     self.draft_list[:n])

    def cat(self, other: Slots) -> Slots:
        q = self.q_rows(len(self)) if other.q.shape[0] else self.q
        if other.q.shape[0]:
            q = torch.cat([q, other.q_rows(len(other))])
        return Slots(*(torch.cat([a, b]) for a, b in zip((self.levels, self.z, self.drafts),
                                                        (other.levels, other.z, other.drafts))),
                     q, self.level_list + other.level_list, self.draft_list + other.draft_list)


class Sjd2Window:
    """Everything the iteration needs that does not change while decoding one image (built once per image:
    the layout's forced ids, the per-level noise tables, the timestep signal of every level)."""

    def __init__(self, adapter: ModelAdapter, noise: NoiseConfig, signal: TimestepSignal, init_latent: str,
                 draft_q: str, norm: EmbeddingNorm | None = None):
        self.adapter, self.noise, self.signal = adapter, noise, signal
        self.layout, self.vocab_size = adapter.layout, adapter.vocab_size
        self.device = adapter.device
        self.norm = (norm if norm is not None else EmbeddingNorm.from_adapter(adapter)).to(self.device)
        self.dim = int(self.norm.mean.numel())
        self.init_latent, self.draft_q = init_latent, draft_q
        self.tables = LevelTables(noise, self.norm, signal, self.device)
        self.sigma = self.tables.sigma[:, 0]  # [K+1]
        self.sigma_top = float(self.sigma[noise.levels])
        forced = forced_ids(self.layout, torch.arange(self.layout.n_tokens, device=self.device))  # [n_tokens]
        self.is_forced = forced != FREE
        # a slot's first draft: its forced id; a free slot has none (its input id, code_start, is never fed clean)
        self.first_draft = torch.where(self.is_forced, forced, self.layout.code_start)
        self.forced_list = [f != FREE for f in forced.tolist()]
        self.join_levels = torch.where(self.is_forced, 0, noise.levels)  # a slot joining the tail at level K
        self._code_table: torch.Tensor | None = None
        self._no_q = torch.zeros(0, self.vocab_size, device=self.device)

    def empty(self) -> Slots:
        d = self.device
        return Slots(torch.zeros(0, dtype=torch.long, device=d), torch.zeros(0, self.dim, device=d),
                     torch.zeros(0, dtype=torch.long, device=d), self._no_q, [], [])

    def new_slots(self, start: int, levels: torch.Tensor | int, generator: torch.Generator) -> Slots:
        """Slots for positions [start, start + n) at ``levels`` [n] (an int n: n slots at level K, as slots
        join the tail); forced positions clean with their id. A free slot holds no draft (its q is unused)."""
        n = levels if isinstance(levels, int) else int(levels.numel())
        stop = start + n
        if start < 0 or stop > self.layout.n_tokens:
            raise IndexError(f"position outside the image sequence [0, {self.layout.n_tokens})")
        forced = self.forced_list[start:stop]
        eps = torch.randn(n, self.dim, generator=generator, device=generator.device)
        if eps.device != self.device:
            eps = eps.to(self.device)
        if isinstance(levels, int):  # free slots at K: sigma_K eps (a forced slot's z is unused: it is clean)
            lv, level_list = self.join_levels[start:stop], [0 if f else self.noise.levels for f in forced]
            z = eps if self.init_latent == "pure_noise" else eps * self.sigma_top
        else:
            lv = torch.where(self.is_forced[start:stop], 0, levels.to(self.device))
            level_list = [0 if f else int(v) for f, v in zip(forced, levels.tolist())]
            z = eps if self.init_latent == "pure_noise" else self.tables.sigma[lv] * eps
        return Slots(lv, z, self.first_draft[start:stop], self._no_q, level_list, forced)

    def inputs(self, slots: Slots, refed: torch.Tensor | None = None) -> torch.Tensor:
        """Model inputs [u + k, D] in the model's dtype: the clean embeddings of the ``refed`` committed
        tokens [u] (none by default), then the slot inputs (one embedding lookup for both)."""
        ids = slots.drafts if refed is None else torch.cat([refed, slots.drafts])
        emb = self.adapter.embed(ids[None])[0]  # [u + k, D]
        if emb.requires_grad:  # called outside the decoder's no_grad: the slots are written in place
            emb = emb.detach()
        self.tables.write_inputs(emb[emb.shape[0] - len(slots):], slots.z, slots.levels)
        return emb

    def clean_estimate(self, tokens: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """x0 in normalised space for each slot: [k, D] (``tokens`` [k] sampled from ``p`` [k, V])."""
        if self.noise.x0 == "sample":
            return self.tables.normalize(self.adapter.embed(tokens[None])[0])
        if self._code_table is None:
            codes = torch.arange(self.layout.code_start, self.layout.code_stop, device=self.device)
            self._code_table = self.norm.normalize(self.adapter.embed(codes[None])[0])  # [N_codes, D]
        p_codes = p[:, self.layout.code_start : self.layout.code_stop]  # [k, N_codes]
        return (p_codes / p_codes.sum(-1, keepdim=True).clamp_min(1e-30)) @ self._code_table

    def advance(self, slots: Slots, fresh: torch.Tensor, p: torch.Tensor, rest: slice = slice(None),
                q: torch.Tensor | None = None) -> Slots:
        """Step 4 for the slots ``rest`` that stay: new drafts ``fresh`` [k], their p [k, V]; noisy ones denoise.
        ``q`` [k, V]: the drafts' q when ``draft_q="sampled"`` (None: p; a coupled redraft passes its own)."""
        levels, z, level_list = slots.levels[rest], slots.z[rest], slots.level_list[rest]
        if any(level_list):
            if self.noise.x0 == "sample":  # row-wise: every row at once (clean rows' z is unused)
                z = self.tables.denoise(z, self.clean_estimate(fresh, p), levels)
            else:  # a matmul over the noisy rows only
                noisy = levels > 0
                z = z.clone()
                z[noisy] = denoise_step(z[noisy], self.clean_estimate(fresh[noisy], p[noisy]), levels[noisy], self.noise)
        if self.draft_q == "sampled":
            q = p if q is None else q
        else:
            q = one_hot(fresh, self.vocab_size)
        return Slots(self.tables.down[levels], z, fresh, q, [v - 1 if v else 0 for v in level_list],
                     [True] * len(level_list))
