"""SJD2 noise, shared by training and decoding (DESIGN.md 5.1, 5.2).

The model is trained on exactly the noise it is decoded with, so both stages call the functions
here; nothing in this module imports ``decode`` or ``train``.

Notation (paper letters, used only inside the math functions)
-------------------------------------------------------------
* ``e``: a token's input embedding [.., D]; ``x0 = norm(e)``: the same in normalised space
  (per-dimension mean/std over the image-code rows of the embedding table, frozen).
* Noise *levels* ``k = 0..K``: index 0 is clean (``t = 0``), index K the noisiest (``t = t_max``).
  ``t_k`` comes from :func:`levels_t` (Karras rho-spacing of levels 1..K by default).
* ``z_t = alpha_t * x0 + sigma_t * eps`` (:func:`noise_latent`), default rectified flow
  (``alpha = 1 - t``, ``sigma = t``).
* Model input of a position at level k (:func:`model_input`): ``denorm(z_k) + s(t_k)`` where ``s`` is
  the timestep signal; at level 0 exactly the clean embedding ``e`` (no signal).
* Denoising step k -> k-1 (DDIM / flow Euler, :func:`denoise_step`):
  ``z_{k-1} = (sigma_{k-1}/sigma_k) z_k + (alpha_{k-1} - alpha_k sigma_{k-1}/sigma_k) x0``.
  With the true ``x0`` it keeps ``eps`` fixed, so it lands exactly on ``alpha_{k-1} x0 + sigma_{k-1} eps``
  and, at level 0, exactly on ``x0``.

Timestep signal
---------------
A signal is a callable ``t [..] -> [.., D]`` (zero where ``t == 0``). It takes ``t`` rather than a level
index so that a model trained with one level grid can be decoded with another ``denoise_steps``:
:class:`ReservedTokenSignal` maps ``t`` to the nearest level of its own grid (``signal_levels``, default
the training ``levels``) and adds the embedding of that level's reserved vocabulary token;
:class:`TimestepMLP` is the option of a small zero-initialised MLP over sinusoidal features of ``t``.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

SCHEDULES = ("rectified_flow", "cosine")
SPACINGS = ("karras", "uniform")
SIGNALS = ("reserved_token", "mlp", "none")
X0_MODES = ("sample", "expectation")


@dataclass(frozen=True)
class NoiseConfig:
    """Everything that defines the SJD2 noise; training and decoding must use the same values.

    schedule: ``rectified_flow`` (alpha = 1 - t, sigma = t; the paper's) | ``cosine``
        (variance preserving: alpha = cos(pi t / 2), sigma = sin(pi t / 2); alpha is exactly 0 at t = 1).
    levels: K, the number of noisy levels (= decoding ``denoise_steps``; the paper uses 25).
    spacing: ``karras`` (levels 1..K at (t_min^(1/rho) + i/(K-1) (t_max^(1/rho) - t_min^(1/rho)))^rho,
        the paper's "Karras timestep schedule") | ``uniform`` (linear in t).
    rho: Karras exponent (7 as in Karras et al. 2022; not pinned by the SJD2 paper).
    t_min: t of level 1 (> 0 so that every noisy level has sigma > 0; not pinned by the paper).
    t_max: t of level K. Default 1.0: the top level is pure noise (z = eps), which is what a fresh
        window slot holds (not pinned by the paper; the paper says the window starts as Gaussian noise).
    timestep_signal: ``reserved_token`` (default, DESIGN 5.2) | ``mlp`` | ``none`` (no signal: ablation).
    signal_levels: size of the reserved-token level grid; None = ``levels``. Set it to the training
        ``levels`` when decoding with a different ``denoise_steps`` than the model was trained with.
    x0: clean estimate a noisy window slot is denoised toward at decode time: ``sample`` (normalised
        embedding of the sampled token; default) | ``expectation`` (probability-weighted mean of the
        normalised image-code embeddings). Training ignores it.
    """

    schedule: str = "rectified_flow"
    levels: int = 25
    spacing: str = "karras"
    rho: float = 7.0
    t_min: float = 0.01
    t_max: float = 1.0
    timestep_signal: str = "reserved_token"
    signal_levels: int | None = None
    x0: str = "sample"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("schedule", self.schedule, SCHEDULES),
            ("spacing", self.spacing, SPACINGS),
            ("timestep_signal", self.timestep_signal, SIGNALS),
            ("x0", self.x0, X0_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown noise {name} {value!r}; pick one of {allowed}")
        if self.levels < 1:
            raise ValueError(f"noise levels (denoise_steps) must be >= 1, got {self.levels}")
        if self.signal_levels is not None and self.signal_levels < 1:
            raise ValueError(f"signal_levels must be >= 1 or null, got {self.signal_levels}")
        if not 0.0 < self.t_min <= self.t_max <= 1.0:
            raise ValueError(
                f"need 0 < t_min <= t_max <= 1, got t_min={self.t_min}, t_max={self.t_max} "
                "(t_min > 0 keeps sigma > 0 at every noisy level; t_max = 1 is pure noise)"
            )
        if self.rho <= 0:
            raise ValueError(f"Karras rho must be > 0, got {self.rho}")

    @property
    def n_signal_levels(self) -> int:
        return self.levels if self.signal_levels is None else self.signal_levels


# ----------------------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------------------
def levels_t(cfg: NoiseConfig, levels: int | None = None) -> torch.Tensor:
    """t per level, float64 [K+1]: index 0 = clean (t = 0), index K = t_max; strictly increasing.

    ``levels`` overrides ``cfg.levels`` (used for the reserved-token signal grid). Computed once per
    (cfg, levels): the decoder asks every forward; each call gets its own copy.
    """
    return _levels_t(cfg, cfg.levels if levels is None else levels).clone()


@functools.lru_cache(maxsize=64)
def _levels_t(cfg: NoiseConfig, k: int) -> torch.Tensor:
    if k == 1:
        noisy = torch.tensor([cfg.t_max], dtype=torch.float64)
    elif cfg.spacing == "uniform":
        noisy = torch.linspace(cfg.t_min, cfg.t_max, k, dtype=torch.float64)
    else:  # karras
        ramp = torch.linspace(0.0, 1.0, k, dtype=torch.float64)
        lo, hi = cfg.t_min ** (1.0 / cfg.rho), cfg.t_max ** (1.0 / cfg.rho)
        noisy = (lo + ramp * (hi - lo)) ** cfg.rho
        noisy[0], noisy[-1] = cfg.t_min, cfg.t_max  # exact endpoints despite pow rounding
    return torch.cat([torch.zeros(1, dtype=torch.float64), noisy])


def alpha_sigma(t: torch.Tensor, cfg: NoiseConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the schedule, same shape and dtype as ``t``; exact at t = 0 and t = 1."""
    if cfg.schedule == "rectified_flow":
        return 1.0 - t, t.clone()
    alpha, sigma = torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)
    alpha = torch.where(t >= 1.0, torch.zeros_like(alpha), alpha)
    sigma = torch.where(t >= 1.0, torch.ones_like(sigma), sigma)
    sigma = torch.where(t <= 0.0, torch.zeros_like(sigma), sigma)
    alpha = torch.where(t <= 0.0, torch.ones_like(alpha), alpha)
    return alpha, sigma


def _coef(table: torch.Tensor, level: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """Per-level scalars ``table[level]`` shaped to broadcast over ``like``'s last (D) dimension."""
    lv = torch.as_tensor(level, dtype=torch.long, device=table.device)
    return table[lv].to(device=like.device, dtype=like.dtype).unsqueeze(-1)


# ----------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------
class EmbeddingNorm:
    """Per-dimension normalisation of embeddings with frozen image-code statistics (DESIGN 5)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        mean = torch.as_tensor(mean).detach().float().reshape(-1)
        std = torch.as_tensor(std).detach().float().reshape(-1)
        if mean.shape != std.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and std {tuple(std.shape)} must both be [D]")
        if bool((std <= 0).any()):
            raise ValueError("embedding std must be > 0 in every dimension (clamp it in embedding_stats())")
        self.mean, self.std = mean, std

    @classmethod
    def from_adapter(cls, adapter: Any) -> EmbeddingNorm:
        """Statistics from ``adapter.embedding_stats()`` (mean/std over the image-code rows)."""
        mean, std = adapter.embedding_stats()
        return cls(mean, std)

    def to(self, device: torch.device | str) -> EmbeddingNorm:
        return EmbeddingNorm(self.mean.to(device), self.std.to(device))

    def normalize(self, e: torch.Tensor) -> torch.Tensor:
        """[.., D] embeddings -> float32 normalised space."""
        return (e.float() - self.mean.to(e.device)) / self.std.to(e.device)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """[.., D] normalised -> float32 embedding space."""
        return z.float() * self.std.to(z.device) + self.mean.to(z.device)


@dataclass(frozen=True, eq=False)
class Sjd2Recipe:
    """What an SJD2 fine-tuning run leaves with its weights (``sjd2.json``), as the decoder needs it.

    ``noise``: the :class:`NoiseConfig` the model was trained with (the decoder refuses other noise);
    ``norm``: the frozen embedding statistics the training inputs were normalised with (those of the
    starting weights); ``timestep_mlp``: the trained :class:`TimestepMLP` (``timestep_signal=mlp``);
    ``training``: how it was trained (name, layout, objective, optim), kept for the record.
    """

    noise: NoiseConfig | None = None
    norm: EmbeddingNorm | None = None
    timestep_mlp: nn.Module | None = None
    training: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``sjd2.json`` form (the MLP's weights go to their own file)."""
        out: dict[str, Any] = {} if self.noise is None else {"noise": asdict(self.noise)}
        out.update(self.training)
        if self.norm is not None:
            out["norm"] = {"mean": self.norm.mean.cpu().tolist(), "std": self.norm.std.cpu().tolist()}
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], timestep_mlp: nn.Module | None = None) -> Sjd2Recipe:
        """Read ``sjd2.json`` (noise keys this code does not know are ignored: older or newer files)."""
        noise = None
        if raw.get("noise") is not None:
            known = set(NoiseConfig.__dataclass_fields__)
            noise = NoiseConfig(**{k: v for k, v in raw["noise"].items() if k in known})
        norm = None
        if raw.get("norm") is not None:
            norm = EmbeddingNorm(torch.tensor(raw["norm"]["mean"]), torch.tensor(raw["norm"]["std"]))
        training = {k: v for k, v in raw.items() if k not in ("noise", "norm")}
        return cls(noise, norm, timestep_mlp, training)


# ----------------------------------------------------------------------------------------------
# timestep signal
# ----------------------------------------------------------------------------------------------
class TimestepSignal(Protocol):
    """``t [..] (float) -> [.., D]`` added to a noisy input; zero where ``t == 0``."""

    def __call__(self, t: torch.Tensor) -> torch.Tensor: ...


class ReservedTokenSignal:
    """The embedding of a reserved vocabulary token per noise level (DESIGN 5.2, default).

    Level ``j`` (1..n) of the signal grid ``levels_t(cfg, n)`` uses ``adapter.reserved_ids[j - 1]``;
    a ``t`` off the grid uses its nearest grid level. Gradients flow into the embedding table (the
    trainer fine-tunes those rows).
    """

    def __init__(self, adapter: Any, cfg: NoiseConfig):
        n = cfg.n_signal_levels
        reserved = tuple(adapter.reserved_ids)
        if n > len(reserved):
            raise ValueError(
                f"the reserved_token timestep signal needs one reserved vocab id per level: {n} levels but "
                f"model {getattr(adapter, 'name', '?')!r} has only {len(reserved)} reserved ids. Use "
                f"levels/denoise_steps <= {len(reserved)}, set signal_levels <= {len(reserved)}, or "
                "timestep_signal=mlp"
            )
        self.adapter = adapter
        self.grid_t = levels_t(cfg, n)[1:].float()  # [n]
        self.ids = torch.tensor(reserved[:n], dtype=torch.long)

    def level_of(self, t: torch.Tensor) -> torch.Tensor:
        """Index 0..n-1 of the nearest signal-grid level per ``t`` (long, shape of ``t``)."""
        grid = self.grid_t.to(t.device)
        return (t.float().unsqueeze(-1) - grid).abs().argmin(-1)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        ids = self.ids.to(t.device)[self.level_of(t)]  # [..]
        emb = self.adapter.embed(ids.reshape(1, -1))  # [1, N, D]
        emb = emb.reshape(*t.shape, emb.shape[-1]).float()  # [.., D]
        return emb * (t > 0).unsqueeze(-1).to(emb.dtype)


class TimestepMLP(nn.Module):
    """Small timestep MLP: sinusoidal features of ``1000 t`` -> Linear -> SiLU -> Linear (zero-init).

    Zero-initialised output layer, so a fresh module leaves the model unchanged. The trainer adds its
    parameters to the optimizer and saves them with the checkpoint; the decoder finds it as
    ``adapter.trained_recipe().timestep_mlp`` (or gets it passed explicitly).
    """

    def __init__(self, hidden_size: int, freq_dim: int = 64, width: int = 256, max_period: float = 10000.0):
        super().__init__()
        if freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {freq_dim}")
        self.freq_dim, self.max_period = freq_dim, max_period
        self.net = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, hidden_size))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def features(self, t: torch.Tensor) -> torch.Tensor:
        """[..] -> [.., freq_dim] sinusoidal features of 1000 t (DiT convention)."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)
        args = 1000.0 * t.float().unsqueeze(-1) * freqs
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        w = self.net[0].weight
        out = self.net(self.features(t).to(device=w.device, dtype=w.dtype)).float()  # [.., D]
        return out * (t > 0).unsqueeze(-1).to(device=out.device, dtype=out.dtype)


class NoSignal:
    """No timestep signal (ablation): zeros."""

    def __init__(self, hidden_size: int):
        self.hidden_size = hidden_size

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*t.shape, self.hidden_size, device=t.device)


def make_signal(cfg: NoiseConfig, adapter: Any, mlp: nn.Module | None = None) -> TimestepSignal:
    """The timestep signal ``cfg.timestep_signal`` names, for ``adapter``.

    ``mlp``: the trained :class:`TimestepMLP` (a checkpoint's ``adapter.trained_recipe().timestep_mlp``).
    """
    if cfg.timestep_signal == "reserved_token":
        return ReservedTokenSignal(adapter, cfg)
    if cfg.timestep_signal == "mlp":
        if mlp is None:
            raise ValueError(
                "timestep_signal=mlp needs the trained TimestepMLP: a checkpoint with timestep_mlp.safetensors "
                "(its recipe's timestep_mlp) or one passed explicitly; or use timestep_signal=reserved_token"
            )
        return mlp
    mean, _ = adapter.embedding_stats()
    return NoSignal(int(mean.numel()))


# ----------------------------------------------------------------------------------------------
# noising and denoising
# ----------------------------------------------------------------------------------------------
def noise_latent(x0: torch.Tensor, level: torch.Tensor | int, eps: torch.Tensor, cfg: NoiseConfig) -> torch.Tensor:
    """z_k = alpha_k x0 + sigma_k eps in normalised space (float32). x0, eps [.., D]; level [..]."""
    alpha, sigma = alpha_sigma(levels_t(cfg), cfg)
    x0, eps = x0.float(), eps.float()
    return _coef(alpha, level, x0) * x0 + _coef(sigma, level, x0) * eps


@functools.lru_cache(maxsize=64)
def _levels_t_float(cfg: NoiseConfig, device: torch.device) -> torch.Tensor:
    return levels_t(cfg).float().to(device)


def levels_t_float(cfg: NoiseConfig, device: torch.device | str) -> torch.Tensor:
    """t per level as :func:`model_input` looks it up: float32 [K+1] on ``device`` (shared: do not modify)."""
    return _levels_t_float(cfg, torch.device(device))


def model_input(
    clean_emb: torch.Tensor, z: torch.Tensor, level: torch.Tensor, norm: EmbeddingNorm, cfg: NoiseConfig,
    signal: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """What the model sees at a position: ``denorm(z) + signal(t_level)``; exactly ``clean_emb`` at level 0.

    clean_emb [.., D] (model dtype; only used where level == 0), z [.., D] normalised latent,
    level [..] long. Returns [.., D] in ``clean_emb``'s dtype.
    """
    level = torch.as_tensor(level, dtype=torch.long, device=clean_emb.device)
    t = _levels_t_float(cfg, clean_emb.device)[level]  # [..]
    noisy = norm.denormalize(z) + signal(t).to(clean_emb.device)  # [.., D] float32
    return torch.where((level == 0).unsqueeze(-1), clean_emb, noisy.to(clean_emb.dtype))


def noisy_embedding(
    clean_emb: torch.Tensor, level: torch.Tensor, eps: torch.Tensor, norm: EmbeddingNorm, cfg: NoiseConfig,
    signal: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Train-time noising: the model input of clean embeddings noised to ``level``.

    clean_emb [.., D], level [..] long in [0, K], eps [.., D] standard normal (normalised space).
    = ``model_input(e, alpha_k norm(e) + sigma_k eps, k)``: the same function the decoder feeds its
    window slots through. Level 0 returns exactly ``clean_emb`` (no noise, no signal).
    """
    z = noise_latent(norm.normalize(clean_emb), level, eps, cfg)
    return model_input(clean_emb, z, level, norm, cfg, signal)


@functools.lru_cache(maxsize=64)
def _step_coefficients(cfg: NoiseConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_z, c_x) per level k (float64 math, stored float32 on ``device``; index 0 unused) of
    :func:`denoise_step`: z_{k-1} = c_z[k] z_k + c_x[k] x0. Built once per (cfg, device)."""
    alpha, sigma = alpha_sigma(levels_t(cfg), cfg)  # float64 [K+1]
    k = torch.arange(1, cfg.levels + 1)
    ratio = sigma[k - 1] / sigma[k]  # sigma_k > 0 for k >= 1 (t_min > 0)
    c_z = torch.cat([torch.zeros(1, dtype=torch.float64), ratio])
    c_x = torch.cat([torch.zeros(1, dtype=torch.float64), alpha[k - 1] - alpha[k] * ratio])
    return c_z.to(device=device, dtype=torch.float32), c_x.to(device=device, dtype=torch.float32)


def step_coefficients(cfg: NoiseConfig, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_z, c_x) [K+1] of :func:`denoise_step`, as it uses them (shared: do not modify)."""
    return _step_coefficients(cfg, torch.device(device))


def denoise_step(z_k: torch.Tensor, x0: torch.Tensor, k: torch.Tensor | int, cfg: NoiseConfig) -> torch.Tensor:
    """One step from level k to k-1 toward the clean estimate ``x0`` (DESIGN 5.1), normalised space.

    z_k, x0 [.., D]; k [..] long (or int) with every k >= 1. Level k-1 = 0 returns exactly ``x0``.
    """
    k = torch.as_tensor(k, dtype=torch.long).cpu()  # indexes the (CPU) schedule tables
    if bool((k < 1).any()):
        raise ValueError("denoise_step needs k >= 1 (level 0 is already clean)")
    z_k, x0 = z_k.float(), x0.float()
    c_z_table, c_x_table = _step_coefficients(cfg, z_k.device)
    c_z, c_x = c_z_table[k.to(z_k.device)].unsqueeze(-1), c_x_table[k.to(z_k.device)].unsqueeze(-1)
    return c_z * z_k + c_x * x0
