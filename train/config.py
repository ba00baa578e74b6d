"""The ``train`` config group as frozen dataclasses (conf/train/*.yaml mirror them field by field).

Kept apart from the loop so that the config can be read, checked and composed (``train.run``) without
building an engine; every value is checked when the dataclass is made, before a run dir exists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.config import check_count
from models.noisy import NoiseConfig
from train.noising import NoiseLayoutConfig
from train.objective import ObjectiveConfig

ENGINES = ("auto", "plain", "deepspeed")
SCHEDULES = ("cosine", "constant")
DATA_SOURCES = ("shapes", "shards", "random")


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
        if not self.eps > 0 or not self.weight_decay >= 0 or not self.grad_clip >= 0:
            raise ValueError(f"train.optim: need eps > 0, weight_decay >= 0 and grad_clip >= 0 (0: no clipping); got "
                             f"eps={self.eps}, weight_decay={self.weight_decay}, grad_clip={self.grad_clip}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.optim.betas={list(self.betas)}: give two numbers in [0, 1) (AdamW's beta1, beta2)")


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
        check_count("train.data.n_examples", self.n_examples, 1, meaning="examples of source=shapes|random")
        check_count("train.data.limit", self.limit, 1, none_ok=True, meaning="the first N records")


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
    noise: NoiseConfig | None = field(default_factory=NoiseConfig)  # None: plain next-token training
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; pick one of {ENGINES}")
        if self.micro_batch < 1 or self.global_batch < 1:
            raise ValueError(f"micro_batch and global_batch must be >= 1, got {self.micro_batch}, {self.global_batch}")
        check_count("train.max_steps", self.max_steps, 0, meaning="optimizer steps; 0: epochs decide")
        check_count("train.epochs", self.epochs, 0, meaning="passes over the data")
        if self.epochs < 1 and self.max_steps < 1:
            raise ValueError("set epochs >= 1 or max_steps >= 1")
        check_count("train.log_every", self.log_every, 1, meaning="steps between loss.csv rows")
        check_count("train.ckpt_every", self.ckpt_every, 0, meaning="steps between checkpoints; 0: the last only")
        check_count("train.keep_checkpoints", self.keep_checkpoints, 1, meaning="newest checkpoints kept")
        check_count("train.stop_after_steps", self.stop_after_steps, 0, meaning="0: off")


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
        if key == "noise" and value is None:
            kwargs[key] = None  # plain next-token training (tiny's pretraining): no noise, no SJD2 recipe
        elif key in nested:
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
