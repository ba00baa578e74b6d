"""Who this process is (:class:`Dist`) and which examples every (step, rank, micro-batch) sees
(:class:`BatchPlan`): a pure function of (seed, step).

This is what makes resume exact: a checkpoint only needs the step besides the engine states, because
the data a step sees never depends on what ran before it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from train.config import TrainConfig


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (torchrun's RANK / WORLD_SIZE / LOCAL_RANK; 0 / 1 / 0 alone)."""

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
