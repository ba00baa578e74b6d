"""The SJD2 objective: next-clean-token cross-entropy on noise-perturbed inputs (DESIGN.md 5).

:class:`NoisyLM` is the one module the optimiser (plain or DeepSpeed ZeRO-3) sees. Its forward takes a
:class:`train.noising.Batch` worth of tensors and returns the loss, so everything that touches
parameters (input embedding, noise through :mod:`models.noisy`, timestep signal, backbone, LM head)
runs inside one module call: ZeRO-3 gathers the partitioned parameters through its module hooks.

Steps of the forward:

1. ``e = embed(input_ids)``                                   # [B, T, D] clean embeddings
2. at positions with level k >= 1: ``denorm(alpha_k norm(e) + sigma_k eps) + signal(t_k)``
   (``models.noisy.noisy_embedding``; eps drawn per row from the row's seed on the model's device)
3. hidden states of the backbone, then the LM head on the loss positions only  # [N, V] float32
4. ``ce = CE(logits, next clean token)``, ``z = z_loss * mean(logsumexp(logits)^2)``; loss = ce + z;
5. with ``distill > 0``: + ``distill * mean KL(start || model)`` over the loss positions whose inputs are all
   clean so far (the prefix before a row's noisy span, clean rows), the teacher a frozen copy of the
   starting weights fed the clean ids: plain AR predictions (cond and CFG rows) stay those of the start;
   with ``distill_cfg = s > 0`` also + ``distill * mean KL`` of the CFG-guided distributions
   ``softmax(lu + s (lc - lu))`` (lc, lu: log-probs of the row and of its unconditional twin, the same image
   tokens after the adapter's unconditional ids), teacher vs model: what CFG decoding samples. CFG
   amplifies small cond/uncond drifts in the tails, which the plain KL barely weighs (bench/sjd2_levers.py).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.config import check_count
from models.noisy import EmbeddingNorm, NoiseConfig, TimestepMLP, make_signal, noisy_embedding
from train.noising import IGNORE


@dataclass(frozen=True)
class ObjectiveConfig:
    """Loss options (YAML: ``train.objective``)."""

    z_loss: float = 1e-5  # weight of the z-loss mean(logsumexp(logits)^2) (Lumina-mGPT: 1e-5; 0 disables)
    loss_chunk_tokens: int = 0  # >0: LM head + CE over chunks of this many tokens, recomputed in backward
    timestep_mlp_width: int = 256  # hidden width of the TimestepMLP (only with noise.timestep_signal=mlp)
    distill: float = 0.0  # >0: weight of KL(starting weights || model) at clean-history loss positions
    #                       (a frozen copy of the start as teacher: one extra forward; plain engine, small models)
    distill_cfg: float = 0.0  # >0 (with distill): also KL of the CFG-guided distributions at this scale (the decoders'
    #                           cfg_scale); costs an unconditional forward of model and teacher per micro-batch

    def __post_init__(self) -> None:
        if not self.z_loss >= 0:
            raise ValueError(f"train.objective.z_loss={self.z_loss} must be >= 0 (0 disables the z-loss)")
        check_count("train.objective.loss_chunk_tokens", self.loss_chunk_tokens, 0, meaning="0: no chunking")
        check_count("train.objective.timestep_mlp_width", self.timestep_mlp_width, 1, meaning="hidden width")
        if self.distill < 0 or self.distill_cfg < 0:
            raise ValueError(f"objective.distill and distill_cfg must be >= 0, got {self.distill}, {self.distill_cfg}")
        if self.distill_cfg > 0 and self.distill == 0:
            raise ValueError("objective.distill_cfg needs objective.distill > 0 (its weight)")


def _submodule_name(root: nn.Module, target: nn.Module) -> str:
    """Dotted name of ``target`` inside ``root`` (found by identity)."""
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def row_noise(levels: torch.Tensor, seeds: torch.Tensor, dim: int, device: torch.device) -> torch.Tensor:
    """Standard-normal eps at the noisy positions, row by row from each row's seed: float32 [N, dim].

    Rows in order, positions in order within a row (the order of ``levels > 0`` nonzero()).
    """
    parts = []
    for r in range(levels.shape[0]):
        n = int((levels[r] > 0).sum())
        if n:
            g = torch.Generator(device=device).manual_seed(int(seeds[r]))
            parts.append(torch.randn(n, dim, generator=g, device=device))
    return torch.cat(parts) if parts else torch.zeros(0, dim, device=device)


class NoisyLM(nn.Module):
    """Adapter model + optional timestep MLP, with the SJD2 loss as its forward.

    The adapter's full model is registered as ``lm`` (so its state dict keys are ``lm.<hf keys>``); the
    timestep MLP, when used, as ``timestep_mlp``. The backbone and LM head are reached by name inside
    ``lm`` (never registered twice).
    """

    def __init__(self, adapter, noise: NoiseConfig | None, norm: EmbeddingNorm | None, objective: ObjectiveConfig):
        super().__init__()
        self.adapter = adapter  # not an nn.Module: no parameters registered through it
        self.lm = adapter.model
        self.noise, self.objective = noise, objective
        self._backbone = _submodule_name(self.lm, adapter.backbone)
        self._lm_head = _submodule_name(self.lm, adapter.lm_head)
        # a list, not an attribute: the teacher must stay out of parameters(), the state dict and the optimiser
        self._teacher = [copy.deepcopy(self.lm).eval().requires_grad_(False)] if objective.distill > 0 else []
        # float32 statistics kept off the module (a bf16 cast of the module must not round them)
        self.norm = EmbeddingNorm(norm.mean, norm.std) if norm is not None else None
        self.timestep_mlp, self._signal_fn = None, None
        if noise is None:  # plain next-token training: clean inputs only, nothing to normalise or signal
            return
        d = int(norm.mean.numel())
        if noise.timestep_signal == "mlp":
            self.timestep_mlp = TimestepMLP(d, width=objective.timestep_mlp_width)
            self._signal_fn = None
        else:
            self.timestep_mlp = None
            self._signal_fn = make_signal(noise, adapter)

    def signal(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep signal [.., D] of noise times ``t`` [..]."""
        return self.timestep_mlp(t) if self.timestep_mlp is not None else self._signal_fn(t)

    def inputs_embeds(self, input_ids: torch.Tensor, levels: torch.Tensor, noise_seeds: torch.Tensor) -> torch.Tensor:
        """Clean embeddings with the noisy positions replaced by their noised version: [B, T, D]."""
        emb = self._embed(self.lm, input_ids)  # [B, T, D]
        if self.noise is None:
            return emb
        noisy = levels > 0
        # No data-dependent shortcut when nothing is noisy: under ZeRO-3 every rank must call the same
        # modules (the signal's embedding / MLP) in the same order, or the parameter all-gathers deadlock.
        eps = row_noise(levels, noise_seeds, emb.shape[-1], emb.device)  # [N, D]
        if self.norm.mean.device != emb.device:
            self.norm = self.norm.to(emb.device)
        rows, cols = noisy.nonzero(as_tuple=True)  # row-major: matches row_noise's order
        z = noisy_embedding(emb[rows, cols], levels[rows, cols], eps, self.norm, self.noise, self.signal)  # [N, D]
        return emb.index_put((rows, cols), z.to(emb.dtype))

    def _embed(self, lm: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ``ids`` through ``lm``'s modules: the backbone's embedding table, or the adapter's
        ``embed_with(lm, ids)`` where inputs come from more than one table (Janus: image codes through their own
        embedding + aligner, text through the text table)."""
        embed_with = getattr(self.adapter, "embed_with", None)
        if embed_with is not None:
            return embed_with(lm, ids)
        return lm.get_submodule(self._backbone).get_input_embeddings()(ids)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        levels: torch.Tensor, noise_seeds: torch.Tensor, image_start: int | None = None,
    ) -> dict[str, torch.Tensor]:
        embeds = self.inputs_embeds(input_ids, levels, noise_seeds)
        out = self.lm.get_submodule(self._backbone)(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
        )
        keep = labels != IGNORE  # [B, T]
        hidden = out.last_hidden_state[keep]  # [N, D]
        target = labels[keep]  # [N]
        if hidden.shape[0] == 0:
            raise ValueError("a micro-batch without loss positions: check the data (image sequence missing?)")
        ce_sum, z_sum = self._head_loss(hidden, target)
        n = torch.tensor(float(hidden.shape[0]), device=hidden.device)
        ce, zl = ce_sum / n, self.objective.z_loss * z_sum / n
        out_d = {"loss": ce + zl, "ce": ce.detach(), "z_loss": zl.detach(), "n_tokens": n}
        if self._teacher:
            dl = self.objective.distill * self._distill(input_ids, attention_mask, levels, keep, out.last_hidden_state,
                                                        image_start)
            out_d["loss"] = out_d["loss"] + dl
            out_d["distill"] = dl.detach()
        return out_d

    def _distill(self, input_ids, attention_mask, levels, keep, hidden_all, image_start=None) -> torch.Tensor:
        """Mean KL(teacher || model) over the loss positions whose inputs are clean up to there (+ the CFG term)."""
        # No shortcut when no position qualifies: under ZeRO-3 every rank must run the same (partitioned) modules in
        # the same order, or the parameter all-gathers deadlock; empty rows give a zero term.
        mask = keep & (levels.cumsum(dim=1) == 0)  # [B, T]
        teacher = self._teacher[0]
        if next(teacher.parameters()).device != input_ids.device:
            teacher.to(input_ids.device)
        t_logp = self._logp(teacher, input_ids, attention_mask, mask, grad=False)
        s_logp = F.log_softmax(self.lm.get_submodule(self._lm_head)(hidden_all[mask]).float(), dim=-1)
        kl = _kl(t_logp, s_logp)
        s = self.objective.distill_cfg
        if s <= 0:
            return kl
        if image_start is None:
            raise ValueError("objective.distill_cfg needs the batch's image_start (the engines pass it)")
        u_ids, u_att, u_mask = self._unconditional_twin(input_ids, attention_mask, mask, image_start)
        t_u = self._logp(teacher, u_ids, u_att, u_mask, grad=False)
        s_u = self._logp(self.lm, u_ids, u_att, u_mask, grad=True)
        guided = [F.log_softmax(lu + s * (lc - lu), dim=-1) for lc, lu in ((t_logp, t_u), (s_logp, s_u))]
        return kl + _kl(*guided)

    def _logp(self, lm, ids, att, mask, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            inputs = {"input_ids": ids} if getattr(self.adapter, "embed_with", None) is None else \
                {"inputs_embeds": self._embed(lm, ids)}
            h = lm.get_submodule(self._backbone)(**inputs, attention_mask=att, use_cache=False).last_hidden_state
            return F.log_softmax(lm.get_submodule(self._lm_head)(h[mask]).float(), dim=-1)

    def _unconditional_twin(self, input_ids, attention_mask, mask, image_start: int):
        """Every row's image tokens after the adapter's unconditional ids (no padding: one prompt for all rows),
        and ``mask`` moved to the same image columns."""
        from train.noising import unconditional_ids

        if not hasattr(self, "_uncond"):
            self._uncond = torch.tensor(unconditional_ids(self.adapter), dtype=input_ids.dtype)
        b, n_u = input_ids.shape[0], self._uncond.numel()
        u = self._uncond.to(input_ids.device).expand(b, n_u)
        ids = torch.cat([u, input_ids[:, image_start:]], dim=1)
        att = torch.cat([torch.ones_like(u, dtype=attention_mask.dtype), attention_mask[:, image_start:]], dim=1)
        if bool(mask[:, :image_start].any()):
            raise ValueError("distill positions inside the prompt columns: image_start does not match the batch")
        u_mask = torch.cat([torch.zeros_like(u, dtype=torch.bool), mask[:, image_start:]], dim=1)
        return ids, att, u_mask

    def _head_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of CE, sum of logsumexp^2) over all rows, optionally chunked with recomputation."""
        chunk = self.objective.loss_chunk_tokens
        if chunk <= 0 or hidden.shape[0] <= chunk:
            return self._chunk_loss(hidden, target)
        ce, z = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, hidden.shape[0], chunk):
            c, zz = checkpoint(self._chunk_loss, hidden[i : i + chunk], target[i : i + chunk], use_reentrant=False)
            ce, z = ce + c, z + zz
        return ce, z

    def _chunk_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.lm.get_submodule(self._lm_head)(hidden).float()  # [n, V]
        ce = F.cross_entropy(logits, target, reduction="sum")
        z = torch.logsumexp(logits, dim=-1).pow(2).sum() if self.objective.z_loss else logits.new_zeros(())
        return ce, z


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p || q), both given as log-probabilities [N, V] (0 for N = 0)."""
    return (p_logp.exp() * (p_logp - q_logp)).sum() / max(p_logp.shape[0], 1)


def split_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a :class:`NoisyLM` state dict into the LM's own keys and the timestep MLP's."""
    out: dict[str, dict[str, torch.Tensor]] = {"lm": {}, "timestep_mlp": {}}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        if head not in out:
            raise KeyError(f"unexpected key {k!r} in a NoisyLM state dict")
        out[head][rest] = v
    return out
