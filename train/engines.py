"""The engines: the same verbs (forward_backward, optimizer_step, lr, save, load, consolidated_state) over
plain PyTorch (one process) and DeepSpeed ZeRO-3 (N processes), so that :func:`train.loop.fit` has one
code path for every world size. Also where the optimizer's parameter groups and the lr schedule live.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from train.checkpoint import LATEST
from train.config import OptimConfig, TrainConfig
from train.noising import Batch
from train.objective import NoisyLM
from train.plan import BatchPlan, Dist

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf" / "deepspeed"


def uses_deepspeed(cfg: TrainConfig, dist: Dist) -> bool:
    return cfg.engine == "deepspeed" or (cfg.engine == "auto" and dist.world > 1)


def init_distributed(cfg: TrainConfig) -> Dist:
    """This process's rank and world (torchrun's environment); starts the process group for DeepSpeed."""
    dist = Dist.from_env()
    use_ds = uses_deepspeed(cfg, dist)
    if dist.world > 1 and not use_ds:
        raise ValueError(
            f"engine=plain runs one process but WORLD_SIZE={dist.world}; use train.engine=deepspeed (or auto) "
            "for multi-process runs, or launch without torchrun"
        )
    if use_ds:
        import deepspeed
        import torch.distributed as tdist

        if torch.cuda.is_available():
            torch.cuda.set_device(dist.local_rank)
        if not tdist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist


def warmup_cosine(step: int, total: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up from
    1/warmup_steps to 1 over the first ``warmup_steps`` steps, then a half cosine down to ``min_lr_ratio``
    at ``total`` (held there after it).

    Not transformers' ``get_cosine_with_min_lr_schedule_with_warmup``: that one starts the warm-up at 0
    (step 0 would not train) and reaches the peak one step later, so every warm-up factor and the cosine
    would shift by one step (checked: up to 1/warmup_steps apart for the conf/train/*.yaml settings).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, total - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """The multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based) under ``cfg.schedule``."""
    if cfg.schedule == "constant" and step >= cfg.warmup_steps:
        return 1.0
    return warmup_cosine(step, total, cfg.warmup_steps, cfg.min_lr_ratio)


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (ndim >= 2, embeddings included), none on the rest."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _adamw(module: NoisyLM, o: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(module, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)


class PlainEngine:
    """One process: AdamW + LambdaLR, bf16 autocast, manual accumulation and clipping."""

    def __init__(self, module: NoisyLM, cfg: TrainConfig, total: int, accumulation: int):
        self.module, self.cfg, self.accumulation = module, cfg, accumulation
        self.device = next(module.parameters()).device
        module.float()  # master weights in fp32 (bf16 only through autocast)
        o = cfg.optim
        self.optimizer = _adamw(module, o)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, total, o))

    def forward_backward(self, batch: Batch) -> dict[str, float]:
        b = batch.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            out = self.module(b.input_ids, b.attention_mask, b.labels, b.levels, b.noise_seeds, image_start=b.image_start)
        (out["loss"] / self.accumulation).backward()
        return {k: float(v.detach()) for k, v in out.items()}

    def optimizer_step(self) -> float:
        clip = self.cfg.optim.grad_clip
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, root: Path, tag: str, client: dict) -> None:
        (root / tag).mkdir(parents=True, exist_ok=True)
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "client": client}
        tmp = root / tag / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(root / tag / "state.pt")
        (root / LATEST).write_text(tag)

    def load(self, root: Path, tag: str) -> dict:
        state = torch.load(root / tag / "state.pt", map_location=self.device, weights_only=False)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client"]

    def consolidated_state(self, root: Path, tag: str) -> dict[str, torch.Tensor] | None:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}


class DeepSpeedEngine:
    """N processes: ``deepspeed.initialize`` over a plain ``torch.optim.AdamW`` (no compiled optimizer ops)."""

    def __init__(self, module: NoisyLM, cfg: TrainConfig, total: int, ds_config: dict):
        import deepspeed

        # DeepSpeed 0.19 calls all_gather_into_tensor / reduce_scatter_tensor, which torch 2.13 deprecates:
        # one FutureWarning per parameter gather would bury the loss lines
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        o = cfg.optim
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=_adamw(module, o), config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, o)),
        )
        self.device = self.engine.device

    def forward_backward(self, batch: Batch) -> dict[str, float]:
        b = batch.to(self.device)
        out = self.engine(b.input_ids, b.attention_mask, b.labels, b.levels, b.noise_seeds, image_start=b.image_start)
        self.engine.backward(out["loss"])  # scales by 1 / gradient_accumulation_steps
        self.engine.step()  # optimizer + scheduler only at the accumulation boundary
        return {k: float(v.detach()) for k, v in out.items()}

    def optimizer_step(self) -> float:
        # DeepSpeed already stepped at the accumulation boundary (inside forward_backward)
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, root: Path, tag: str, client: dict) -> None:
        self.engine.save_checkpoint(str(root), tag=tag, client_state=client)  # writes root/latest

    def load(self, root: Path, tag: str) -> dict:
        path, client = self.engine.load_checkpoint(str(root), tag=tag)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {root / tag}")
        return client

    def consolidated_state(self, root: Path, tag: str) -> dict[str, torch.Tensor] | None:
        """fp32 master weights of the whole model from the ZeRO-3 checkpoint ``tag`` (rank 0; None elsewhere)."""
        import torch.distributed as dist
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        dist.barrier()
        state = None
        if dist.get_rank() == 0:
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        dist.barrier()
        return state


def deepspeed_config(cfg: TrainConfig, plan: BatchPlan, device_type: str) -> dict:
    """The DeepSpeed JSON with the values the train config owns filled in (``"auto"`` entries).

    The train config is the one source of batch sizes, clipping and precision; a JSON that states a
    different value is refused rather than silently overridden.
    """
    name = cfg.deepspeed_config
    if name == "auto":
        name = str(DS_CONFIG_DIR / ("zero3.json" if device_type == "cuda" else "zero3_cpu.json"))
    path = Path(name)
    if not path.is_file():
        from models import resolve_path

        path = resolve_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {name} does not exist; see conf/deepspeed/*.json")
    ds = json.loads(path.read_text())
    owned = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "train_batch_size": cfg.global_batch,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in owned.items():
        _fill(ds, key, value, path)
    ds.setdefault("bf16", {})
    _fill(ds["bf16"], "enabled", bool(cfg.bf16), path, "bf16.enabled", "train.bf16")
    if ds.get("zero_optimization", {}).get("stage") != 3:
        raise ValueError(f"{path}: this trainer is written for ZeRO stage 3 (zero_optimization.stage: 3)")
    return ds


def _fill(d: dict, key: str, value: Any, path: Path, label: str | None = None, owner: str = "the train config") -> None:
    if d.get(key, "auto") == "auto":
        d[key] = value
    elif d[key] != value:
        raise ValueError(
            f"{path}: {label or key} = {d[key]!r} but {owner} says {value!r}; set it to \"auto\" in the JSON "
            "(the train config owns batch sizes, clipping and precision) or change the train config"
        )


def make_engine(module: NoisyLM, cfg: TrainConfig, total: int, plan: BatchPlan,
                dist: Dist) -> PlainEngine | DeepSpeedEngine:
    """DeepSpeed ZeRO-3 when the config or the world size asks for it, else the plain engine."""
    if uses_deepspeed(cfg, dist):
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        return DeepSpeedEngine(module, cfg, total, deepspeed_config(cfg, plan, device_type))
    return PlainEngine(module, cfg, total, plan.accumulation)
