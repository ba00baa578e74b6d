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
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.noisy import EmbeddingNorm, NoiseConfig
from train.noising import Batch, NoiseLayoutConfig, make_batch, unconditional_ids
from train.objective import NoisyLM, ObjectiveConfig, split_state

ENGINES = ("auto", "plain", "deepspeed")
SCHEDULES = ("cosine", "constant")
DATA_SOURCES = ("shapes", "shards", "random")
LOSS_COLUMNS = ("step", "epoch", "loss", "ce", "z_loss", "lr", "grad_norm", "n_tokens", "step_time_s")
LATEST = "latest"  # file in the checkpoint folder naming the newest tag (DeepSpeed's convention too)
DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf" / "deepspeed"


# ---------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + warm-up + cosine/constant schedule + clipping (YAML: ``train.optim``)."""

    lr: float = 2e-5  # peak learning rate (the SJD2 paper: 2e-5)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices only; norms, biases and 1-D parameters get none
    warmup_steps: int = 100  # linear warm-up from lr/warmup_steps to lr
    schedule: str = "cosine"  # "cosine" (down to min_lr_ratio * lr at the last step) | "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 4.0  # max global grad norm (Lumina-mGPT: 4.0); 0 disables

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.schedule!r}; pick one of {SCHEDULES}")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1; got {self}")


@dataclass(frozen=True)
class DataConfig:
    """Where training records come from (YAML: ``train.data``)."""

    source: str = "shapes"  # "shapes": generated + tokenised at start (tiny); "shards": train/data.py output;
    #                         "random": random image codes under shapes captions (dry runs, tests)
    path: str | None = None  # shards folder (source=shards)
    n_examples: int = 4096  # source=shapes/random: how many examples
    seed: int = 1  # source=shapes/random: example i is drawn from (seed, i)
    limit: int | None = None  # use only the first N records (None: all)

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ValueError(f"unknown train.data.source {self.source!r}; pick one of {DATA_SOURCES}")


@dataclass(frozen=True)
class TrainConfig:
    """The whole ``train`` config group (conf/train/*.yaml mirror it field by field)."""

    name: str = "sjd2"
    seed: int = 0  # data order, noise layout and Gaussian noise
    epochs: int = 6
    max_steps: int = 0  # >0: train exactly this many optimizer steps (epochs then only set the data order)
    micro_batch: int = 8  # sequences per process per forward
    global_batch: int = 64  # sequences per optimizer step over all processes (= world * micro * accumulation)
    bf16: bool = False  # bf16 autocast (plain) / bf16 ZeRO-3 with fp32 master weights (DeepSpeed)
    grad_checkpointing: bool = False  # recompute transformer blocks in backward (real models: on)
    engine: str = "auto"  # "auto": DeepSpeed when WORLD_SIZE > 1, else plain | "plain" | "deepspeed"
    deepspeed_config: str = "auto"  # JSON path; "auto": conf/deepspeed/zero3.json on CUDA, zero3_cpu.json on CPU
    log_every: int = 1  # steps between loss.csv rows / wandb points
    ckpt_every: int = 500  # steps between checkpoints (the last step is always saved); 0: last only
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    stop_after_steps: int = 0  # >0: checkpoint and exit after this step as if killed (resume tests, time boxes)
    export_dir: str | None = None  # final weights in the model's own format; None: <run_dir>/export
    optim: OptimConfig = field(default_factory=OptimConfig)
    layout: NoiseLayoutConfig = field(default_factory=NoiseLayoutConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; pick one of {ENGINES}")
        if self.micro_batch < 1 or self.global_batch < 1:
            raise ValueError(f"micro_batch and global_batch must be >= 1, got {self.micro_batch}, {self.global_batch}")
        if self.epochs < 1 and self.max_steps < 1:
            raise ValueError("set epochs >= 1 or max_steps >= 1")


def train_config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A plain mapping (e.g. the resolved ``cfg.train``) -> :class:`TrainConfig`; unknown keys are errors."""
    nested = {"optim": OptimConfig, "layout": NoiseLayoutConfig, "noise": NoiseConfig,
              "objective": ObjectiveConfig, "data": DataConfig}
    known = {f for f in TrainConfig.__dataclass_fields__}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown train config keys {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {}
    for key, value in raw.items():
        if key in nested:
            cls = nested[key]
            bad = set(value or {}) - set(cls.__dataclass_fields__)
            if bad:
                raise ValueError(f"unknown keys {sorted(bad)} in train.{key}; known: {sorted(cls.__dataclass_fields__)}")
            value = dict(value or {})
            if key == "optim" and "betas" in value:
                value["betas"] = tuple(value["betas"])
            kwargs[key] = cls(**value)
        else:
            kwargs[key] = value
    return TrainConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------
# Distributed context and the batch plan


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))


@dataclass(frozen=True)
class BatchPlan:
    """Which examples each (step, rank, micro-batch) sees: a pure function of (seed, step).

    Epoch e visits the records in the order of ``default_rng([seed, e]).permutation(n)``; step s takes the
    global batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch`` (the tail that does not fill a
    global batch is dropped). Rank r's micro-batch a holds the global batch's slice
    ``[(a * world + r) * micro, ... + micro)``.
    """

    n_records: int
    global_batch: int
    micro_batch: int
    world: int
    seed: int

    def __post_init__(self) -> None:
        per_step = self.world * self.micro_batch
        if self.global_batch % per_step:
            raise ValueError(
                f"impossible batch config: global_batch={self.global_batch} is not divisible by "
                f"world size {self.world} x micro_batch {self.micro_batch} = {per_step}; set train.global_batch "
                f"to a multiple of {per_step} or change train.micro_batch / the number of processes"
            )
        if self.n_records < self.global_batch:
            raise ValueError(
                f"{self.n_records} training records cannot fill one global batch of {self.global_batch}; "
                "add data (train.data) or lower train.global_batch"
            )

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.world * self.micro_batch)

    @property
    def steps_per_epoch(self) -> int:
        return self.n_records // self.global_batch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def micro_keys(self, step: int, rank: int) -> list[list[tuple[int, int]]]:
        """Per micro-batch of ``rank`` at ``step``: the (epoch, record index) keys of its rows."""
        epoch, j = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_records)
        glob = perm[j * self.global_batch : (j + 1) * self.global_batch]
        out = []
        for a in range(self.accumulation):
            lo = (a * self.world + rank) * self.micro_batch
            out.append([(epoch, int(i)) for i in glob[lo : lo + self.micro_batch]])
        return out


def total_steps(cfg: TrainConfig, plan: BatchPlan) -> int:
    return cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * plan.steps_per_epoch


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (ndim >= 2, embeddings included), none on the rest."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------------
# Engines: the same four verbs over plain PyTorch and DeepSpeed ZeRO-3


class PlainEngine:
    """One process: AdamW + LambdaLR, bf16 autocast, manual accumulation and clipping."""

    def __init__(self, module: NoisyLM, cfg: TrainConfig, total: int, accumulation: int):
        self.module, self.cfg, self.accumulation = module, cfg, accumulation
        self.device = next(module.parameters()).device
        module.float()  # master weights in fp32 (bf16 only through autocast)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(module, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, total, o))

    def forward_backward(self, batch: Batch) -> dict[str, float]:
        b = batch.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            out = self.module(b.input_ids, b.attention_mask, b.labels, b.levels, b.noise_seeds)
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

    def __init__(self, module: NoisyLM, cfg: TrainConfig, total: int, plan: BatchPlan, ds_config: dict):
        import deepspeed

        o = cfg.optim
        optimizer = torch.optim.AdamW(param_groups(module, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, o)),
        )
        self.device = self.engine.device

    def forward_backward(self, batch: Batch) -> dict[str, float]:
        b = batch.to(self.device)
        out = self.engine(b.input_ids, b.attention_mask, b.labels, b.levels, b.noise_seeds)
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


# ---------------------------------------------------------------------------------------------------
# Run-dir files: loss curve, environment, checkpoints


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


def environment(dist: Dist, device: torch.device) -> dict[str, Any]:
    """Versions, git hash, device and world size of this run."""
    import transformers

    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = ""
    env = {"git": git, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": str(device), "world_size": dist.world,
           "host": platform.node()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return env


def latest_tag(ckpt_root: Path) -> str | None:
    f = ckpt_root / LATEST
    return f.read_text().strip() if f.is_file() else None


def prune_checkpoints(ckpt_root: Path, keep: int, protect: str) -> None:
    tags = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for p in tags[: max(0, len(tags) - max(keep, 1))]:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# The loop


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
    dist = _init_distributed(cfg)
    plan = BatchPlan(len(records), cfg.global_batch, cfg.micro_batch, dist.world, cfg.seed)
    total = total_steps(cfg, plan)
    ckpt_root = run_dir / "checkpoints"
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # 1. the module and the engine
    module = _build_module(adapter, cfg)
    engine = _make_engine(module, cfg, total, plan, dist)
    if dist.main:
        (run_dir / "env.json").write_text(json.dumps(environment(dist, engine.device), indent=1))

    # 2. resume
    start = _resume(engine, ckpt_root, resume, dist, cfg)
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
                               cfg.layout, cfg.noise.levels, cfg.seed)
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
            _checkpoint(engine, ckpt_root, done, cfg, dist)
            log.plot()
    bar.close()
    done = max(start, stop)

    # 4. export
    export = None
    if done >= total:  # the last step is always checkpointed: consolidate from it
        state = engine.consolidated_state(ckpt_root, _tag(done))
        if dist.main:
            export = _export_path(cfg.export_dir) if cfg.export_dir else run_dir / "export"
            export_weights(adapter, split_state(state), export, cfg, module.norm)
    log.plot()
    return FitResult(done, total, losses, export, run_dir)


def _export_path(path: str) -> Path:
    """A relative export_dir is relative to the repository root (where conf/model/*.yaml paths point)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(__file__).resolve().parents[1] / p


def _init_distributed(cfg: TrainConfig) -> Dist:
    dist = Dist.from_env()
    use_ds = cfg.engine == "deepspeed" or (cfg.engine == "auto" and dist.world > 1)
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


def _uses_deepspeed(cfg: TrainConfig, dist: Dist) -> bool:
    return cfg.engine == "deepspeed" or (cfg.engine == "auto" and dist.world > 1)


def _build_module(adapter: Any, cfg: TrainConfig) -> NoisyLM:
    norm = EmbeddingNorm.from_adapter(adapter)  # frozen statistics of the starting weights
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


def _make_engine(module: NoisyLM, cfg: TrainConfig, total: int, plan: BatchPlan, dist: Dist):
    if _uses_deepspeed(cfg, dist):
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        return DeepSpeedEngine(module, cfg, total, plan, deepspeed_config(cfg, plan, device_type))
    return PlainEngine(module, cfg, total, plan.accumulation)


def _tag(step: int) -> str:
    return f"step_{step:07d}"


def _client_state(step: int, cfg: TrainConfig, dist: Dist) -> dict:
    return {"step": step, "world_size": dist.world, "global_batch": cfg.global_batch, "seed": cfg.seed,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _checkpoint(engine: Any, root: Path, step: int, cfg: TrainConfig, dist: Dist) -> None:
    if dist.main:
        root.mkdir(parents=True, exist_ok=True)
    engine.save(root, _tag(step), _client_state(step, cfg, dist))
    if dist.main:
        prune_checkpoints(root, cfg.keep_checkpoints, _tag(step))


def _resume(engine: Any, root: Path, resume: bool, dist: Dist, cfg: TrainConfig) -> int:
    tag = latest_tag(root)
    if tag is None:
        return 0
    if not resume:
        raise FileExistsError(
            f"{root} already holds checkpoint {tag}; pass resume=true to continue it, or pick a new run_dir"
        )
    client = engine.load(root, tag)
    for key, now in (("world_size", dist.world), ("global_batch", cfg.global_batch), ("seed", cfg.seed)):
        if client.get(key) != now:
            raise ValueError(
                f"checkpoint {root / tag} was written with {key}={client.get(key)}, this run has {key}={now}; "
                "resume with the same setting (the data order and ZeRO partitions depend on it) or start a new run_dir"
            )
    torch.set_rng_state(client["torch_rng"].cpu() if hasattr(client["torch_rng"], "cpu") else client["torch_rng"])
    if client.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(client["cuda_rng"])
    return int(client["step"])


def _pad_id(adapter: Any) -> int:
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


# ---------------------------------------------------------------------------------------------------
# Export


def export_weights(adapter: Any, state: dict[str, dict[str, torch.Tensor]], out_dir: str | Path,
                   cfg: TrainConfig, norm: EmbeddingNorm | None = None) -> Path:
    """Write the fine-tuned weights in the model's own format (tiny: config.json + model.safetensors +
    vq.safetensors; HF models: ``save_pretrained`` + tokenizer), plus ``sjd2.json`` and, with the MLP
    timestep signal, ``timestep_mlp.safetensors``.

    The recipe (``sjd2.json``; tiny also in ``config.extra["sjd2"]``) holds the noise options the model was
    trained with (the decoder checks them) and ``norm``: the frozen mean/std the training inputs
    were normalised with (those of the starting weights; ``decode.sjd2.embedding_norm`` reads them).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = {"noise": asdict(cfg.noise), "layout": asdict(cfg.layout), "objective": asdict(cfg.objective),
              "optim": {**asdict(cfg.optim), "betas": list(cfg.optim.betas)}, "name": cfg.name}
    if norm is not None:
        recipe["norm"] = {"mean": norm.mean.cpu().tolist(), "std": norm.std.cpu().tolist()}
    lm_state = state["lm"]
    if getattr(adapter, "config", None) is not None and type(adapter).__name__ == "TinyAdapter":
        _export_tiny(adapter, lm_state, out, recipe)
    else:
        adapter.model.save_pretrained(str(out), state_dict=lm_state)
        for attr in ("tokenizer", "processor"):
            tok = getattr(adapter, attr, None)
            if tok is not None and hasattr(tok, "save_pretrained"):
                tok.save_pretrained(str(out))
    if state.get("timestep_mlp"):
        save_file({k: v.contiguous() for k, v in state["timestep_mlp"].items()}, str(out / "timestep_mlp.safetensors"))
    (out / "sjd2.json").write_text(json.dumps(recipe, indent=1))
    return out


def _export_tiny(adapter: Any, lm_state: dict[str, torch.Tensor], out: Path, recipe: dict) -> None:
    from transformers import LlamaForCausalLM

    from models import tiny

    config = replace(adapter.config, extra={**dict(adapter.config.extra), "sjd2": recipe})
    model = LlamaForCausalLM(config.llama_config())
    model.load_state_dict({k: v.float() for k, v in lm_state.items()})
    fresh = tiny.TinyAdapter(model, config, vq=adapter.vq, image_size=adapter.image_size, name=adapter.name)
    tiny.save(fresh, out)
    if adapter.vq is not None:
        adapter.vq.save(out / "vq.safetensors")
