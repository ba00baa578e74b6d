"""The SJD2 fine-tuning loop: one code path for 1 process (plain PyTorch) and N processes (DeepSpeed ZeRO-3).

:func:`fit` reads like the recipe::

    plan = BatchPlan(...)                      # which examples every (step, rank, micro-batch) sees
    engine = make_engine(...)                  # plain AdamW or DeepSpeed ZeRO-3 around NoisyLM
    step = resume(engine, run_dir)             # model + optimizer + scheduler + RNG + step
    for step in steps:
        for micro-batch of this rank:
            batch = make_batch(...)            # left-padded, noised layout, labels = next clean token
            stats = engine.forward_backward(batch)
        grad_norm = engine.optimizer_step()    # clip, AdamW, LR schedule
        log(step, stats); checkpoint(step)
    export(consolidated weights)               # the model's own format, loadable as model=<name>_sjd2

Exact resume: the data a step sees is a pure function of (seed, step) (a per-epoch permutation plus
per-example generators, :mod:`train.noising`), so a checkpoint only needs the step besides the states;
the loss curve after a kill + restart equals the uninterrupted one.

The parts live beside this file: :mod:`train.config` (the config dataclasses), :mod:`train.plan` (the
batch plan), :mod:`train.engines` (plain / DeepSpeed, lr schedule), :mod:`train.checkpoint` (save, resume,
prune) and :mod:`train.export` (the weights out, through ``adapter.export``); this module is the loop and
its ``loss.csv``.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.rundir import environment
from models.noisy import EmbeddingNorm
from train.checkpoint import resume as restore
from train.checkpoint import save_checkpoint, tag
from train.config import TrainConfig
from train.engines import init_distributed, make_engine
from train.export import export_path, export_weights
from train.noising import make_batch, unconditional_ids
from train.objective import NoisyLM, split_state
from train.plan import BatchPlan, Dist, total_steps

LOSS_COLUMNS = ("step", "epoch", "loss", "ce", "z_loss", "lr", "grad_norm", "n_tokens", "step_time_s")


class LossLog:
    """``loss.csv`` (one row per logged step) + ``loss.png``; truncated to the resumed step on restart."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool):
        self.path, self.enabled = run_dir / "loss.csv", enabled
        if not enabled:
            return
        rows = self.read(self.path) if self.path.is_file() else []
        keep = [r for r in rows if int(r["step"]) <= start_step]
        with open(self.path, "w") as f:
            f.write(",".join(LOSS_COLUMNS) + "\n")
            f.writelines(",".join(str(r[c]) for c in LOSS_COLUMNS) + "\n" for r in keep)

    def append(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(",".join(_fmt(row[c]) for c in LOSS_COLUMNS) + "\n")

    @staticmethod
    def read(path: Path) -> list[dict[str, str]]:
        lines = Path(path).read_text().splitlines()
        if not lines:
            return []
        head = lines[0].split(",")
        return [dict(zip(head, line.split(","))) for line in lines[1:] if line.count(",") == len(head) - 1]

    def plot(self) -> None:
        if not self.enabled or not self.path.is_file():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read(self.path)
        if not rows:
            return
        steps = [int(r["step"]) for r in rows]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [float(r["ce"]) for r in rows], label="cross-entropy (next clean token)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.path.with_suffix(".png"), dpi=100)
        plt.close(fig)


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


@dataclass
class FitResult:
    steps_done: int  # optimizer steps completed (over the whole run, resumed ones included)
    total_steps: int
    losses: list[float]  # loss of every step run in this call
    export_dir: Path | None  # where the weights were exported (None: stopped early or not rank 0)
    run_dir: Path


def fit(
    adapter: Any,
    records: Sequence[tuple[Sequence[int], int]],
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    logger: Callable[[dict[str, Any], int], None] | None = None,
) -> FitResult:
    """Fine-tune ``adapter`` for next-clean-token prediction on ``records`` ((input_ids, prompt_len) pairs).

    Multi-process when launched with ``torchrun`` (WORLD_SIZE > 1): DeepSpeed ZeRO-3. ``logger(row, step)``
    receives every logged row (wandb). Returns a :class:`FitResult`; rank 0 exports the final weights.
    """
    run_dir = Path(run_dir)
    dist = init_distributed(cfg)
    plan = BatchPlan(len(records), cfg.global_batch, cfg.micro_batch, dist.world, cfg.seed)
    total = total_steps(cfg, plan)
    ckpt_root = run_dir / "checkpoints"
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # 1. the module and the engine
    module = _build_module(adapter, cfg)
    engine = make_engine(module, cfg, total, plan, dist)
    if dist.main:
        (run_dir / "env.json").write_text(json.dumps(_environment(dist, engine.device), indent=1))

    # 2. resume
    start = restore(engine, ckpt_root, resume, dist, cfg)
    log = LossLog(run_dir, start, dist.main)

    # 3. train
    uncond, pad = unconditional_ids(adapter), _pad_id(adapter)
    stop = min(total, cfg.stop_after_steps) if cfg.stop_after_steps > 0 else total
    bar = _progress_bar(start, total, progress and dist.main)
    losses: list[float] = []
    for step in range(start, stop):
        t0 = time.perf_counter()
        lr = engine.lr  # the lr this step uses (DeepSpeed steps its scheduler inside forward_backward)
        stats = []
        for keys in plan.micro_keys(step, dist.rank):
            batch = make_batch([records[i] for _, i in keys], keys, adapter.layout, uncond, pad,
                               cfg.layout, cfg.noise.levels if cfg.noise else 0, cfg.seed)
            stats.append(engine.forward_backward(batch))
        grad_norm = engine.optimizer_step()
        row = _step_row(step, plan, stats, lr, grad_norm, time.perf_counter() - t0, dist, engine.device)
        losses.append(row["loss"])
        if dist.main and ((step + 1) % cfg.log_every == 0 or step + 1 == stop):
            log.append(row)
            if logger:
                logger(row, step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
        done = step + 1
        if done == stop or (cfg.ckpt_every > 0 and done % cfg.ckpt_every == 0):
            save_checkpoint(engine, ckpt_root, done, cfg, dist)
            log.plot()
    bar.close()
    done = max(start, stop)

    # 4. export
    export = None
    if done >= total:  # the last step is always checkpointed: consolidate from it
        state = engine.consolidated_state(ckpt_root, tag(done))
        if dist.main:
            export = export_path(cfg.export_dir) if cfg.export_dir else run_dir / "export"
            export_weights(adapter, split_state(state), export, cfg, module.norm)
    log.plot()
    return FitResult(done, total, losses, export, run_dir)


def _build_module(adapter: Any, cfg: TrainConfig) -> NoisyLM:
    norm = EmbeddingNorm.from_adapter(adapter) if cfg.noise else None  # frozen statistics of the starting weights
    module = NoisyLM(adapter, cfg.noise, norm, cfg.objective)
    if cfg.grad_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(adapter.model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            adapter.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            adapter.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    adapter.model.config.use_cache = False
    module.train()
    return module


def _environment(dist: Dist, device: torch.device) -> dict[str, Any]:
    """The run's ``env.json``: the common fields plus what only training has (world size, DeepSpeed)."""
    extra: dict[str, Any] = {"world_size": dist.world}
    try:
        import deepspeed

        extra["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return environment(device, **extra)


def _pad_id(adapter: Any) -> int:
    if getattr(adapter, "pad_id", None) is not None:  # an adapter with its own id space (Janus) names its pad
        return int(adapter.pad_id)
    cfg = getattr(adapter.model, "config", None)
    pad = getattr(cfg, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _step_row(step: int, plan: BatchPlan, stats: list[dict], lr: float, grad_norm: float, dt: float,
              dist: Dist, device: torch.device) -> dict[str, Any]:
    """Mean of the micro-batch stats over micro-batches and ranks (the all-reduce runs on the engine's
    device: NCCL reduces CUDA tensors only)."""
    keys = ("loss", "ce", "z_loss")
    local = torch.tensor([sum(s[k] for s in stats) / len(stats) for k in keys] + [sum(s["n_tokens"] for s in stats)],
                         dtype=torch.float64, device=device)
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.all_reduce(local)
        local[:3] /= dist.world
    vals = local.cpu().tolist()
    return {"step": step + 1, "epoch": plan.epoch_of(step), "loss": vals[0], "ce": vals[1], "z_loss": vals[2],
            "lr": lr, "grad_norm": grad_norm, "n_tokens": int(vals[3]), "step_time_s": dt}


def _progress_bar(start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="sjd2 fine-tune", unit="step",
                dynamic_ncols=True)


