"""``python -m train ... dry_run=true gpus=8 gpu_memory_gb=80``: the plan of a fine-tuning run before it
runs. No weights are read and no run dir is written (the architecture comes from :mod:`models.meta`).

Per GPU under ZeRO-3: the model states by DeepSpeed's own estimator
(``estimate_zero3_model_states_mem_needs``: bf16 parameters + gradients and the fp32 Adam master,
momentum and variance, partitioned over every GPU, plus the largest layer gathered), the activations of one
micro-batch, the LM head's logits, and a fixed reserve (CUDA context, allocator slack). Activations follow
Korthikanti et al. 2022 (``34 * s * b * h`` bytes per layer in 16-bit, no ``s^2`` term: SDPA / flash
attention); with gradient checkpointing only each layer's input stays (``2 * s * b * h``) and one layer is
recomputed at a time. Logits cost ``10`` bytes per token and vocabulary entry (16-bit logits, float32
log-softmax and its gradient) over ``train.objective.loss_chunk_tokens`` tokens at a time.
A plan that does not fit is refused with one line saying what to change.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from core.errors import UserError
from models.meta import ModelFacts, count, gib, model_facts
from train.config import TrainConfig

RESERVE_BYTES = 2 * 2**30  # CUDA context + allocator fragmentation per GPU
PROMPT_TOKENS = 128  # assumed prompt length when the data is not there to measure
LOGIT_BYTES = 10  # per token x vocab entry: 16-bit logits + float32 log-softmax + its gradient
LAYER_ACT_BYTES = 34  # per token x hidden in one transformer layer, 16-bit (Korthikanti et al. 2022)


@dataclass(frozen=True)
class DataFacts:
    records: int | None  # None: unknown (no data yet and no dry_run_records)
    seq_len: int  # longest record (prompt + image tokens)
    source: str


@dataclass(frozen=True)
class TrainPlan:
    model: ModelFacts
    data: DataFacts
    gpus: int
    nodes: int
    gpu_bytes: float
    micro_batch: int
    global_batch: int
    grad_checkpointing: bool
    loss_chunk_tokens: int
    states_bytes: float
    activation_bytes: float
    logits_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.states_bytes + self.activation_bytes + self.logits_bytes + RESERVE_BYTES

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu_bytes

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.gpus * self.micro_batch)


def zero3_states_bytes(model: ModelFacts, gpus: int, nodes: int) -> float:
    """Per-GPU model states under ZeRO-3 without offload: DeepSpeed's estimator."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu_mem, _ = estimate_zero3_model_states_mem_needs(
        model.n_params, model.largest_layer, num_gpus_per_node=gpus // nodes, num_nodes=nodes,
        cpu_offload=False, cpu_offload_params=False, zero_init=True)
    return float(gpu_mem)


def activation_bytes(model: ModelFacts, micro_batch: int, seq: int, checkpointing: bool) -> float:
    tokens = micro_batch * seq
    one_layer = LAYER_ACT_BYTES * tokens * model.hidden
    if checkpointing:
        return model.layers * 2 * tokens * model.hidden + one_layer
    return model.layers * one_layer


def logits_bytes(model: ModelFacts, micro_batch: int, seq: int, chunk: int) -> float:
    tokens = micro_batch * seq
    return LOGIT_BYTES * (min(chunk, tokens) if chunk > 0 else tokens) * model.vocab


def data_facts(train: TrainConfig, model: ModelFacts, records: int | None) -> DataFacts:
    """How many records ``train.data`` holds (shards: their row count and longest sequence)."""
    d = train.data
    seq = PROMPT_TOKENS + model.image_tokens
    if d.source in ("shapes", "random"):
        n = d.n_examples if d.limit is None else min(d.n_examples, d.limit)
        return DataFacts(n, seq, f"source={d.source}: {n} generated records")
    from models import resolve_path

    path = resolve_path(d.path) if d.path else None
    if path is not None and path.is_dir():
        from train.data import load_shards

        ds = load_shards(path)
        n = len(ds) if d.limit is None else min(len(ds), d.limit)
        seq = max(len(ids) for ids in ds.select(range(min(n, 256)))["input_ids"])
        return DataFacts(n, seq, f"{path}: {n} records (longest of the first 256: {seq} tokens)")
    if records is not None:
        return DataFacts(records, seq, f"dry_run_records={records} (no shards at {d.path} yet)")
    return DataFacts(None, seq, f"no shards at {d.path} yet: pass dry_run_records=N for the step counts")


def make_plan(train: TrainConfig, model: ModelFacts, data: DataFacts, gpus: int, nodes: int,
              gpu_memory_gb: float) -> TrainPlan:
    seq = data.seq_len
    return TrainPlan(
        model=model, data=data, gpus=gpus, nodes=nodes, gpu_bytes=gpu_memory_gb * 2**30,
        micro_batch=train.micro_batch, global_batch=train.global_batch,
        grad_checkpointing=train.grad_checkpointing, loss_chunk_tokens=train.objective.loss_chunk_tokens,
        states_bytes=zero3_states_bytes(model, gpus, nodes),
        activation_bytes=activation_bytes(model, train.micro_batch, seq, train.grad_checkpointing),
        logits_bytes=logits_bytes(model, train.micro_batch, seq, train.objective.loss_chunk_tokens))


def what_to_change(plan: TrainPlan, train: TrainConfig) -> str:
    """One line: the smallest change that makes ``plan`` fit."""
    gb = plan.gpu_bytes / 2**30
    retry = lambda **kw: make_plan(replace(train, **kw), plan.model, plan.data, plan.gpus, plan.nodes, gb)
    if not plan.grad_checkpointing and retry(grad_checkpointing=True).fits:
        return "set train.grad_checkpointing=true"
    per_step = plan.global_batch // plan.gpus
    for m in range(plan.micro_batch - 1, 0, -1):
        if per_step % m == 0 and retry(micro_batch=m).fits:
            return f"set train.micro_batch={m} (gradient accumulation {per_step // m} keeps the global batch)"
    if not plan.grad_checkpointing and retry(grad_checkpointing=True, micro_batch=1).fits:
        return "set train.grad_checkpointing=true train.micro_batch=1"
    for g in (2 ** k for k in range(1, 12)):
        if g > plan.gpus:
            more = make_plan(replace(train, micro_batch=1, grad_checkpointing=True), plan.model, plan.data, g,
                             max(plan.nodes, math.ceil(g / 8)), gb)
            if more.fits:
                return (f"use more GPUs: gpus={g} with train.grad_checkpointing=true train.micro_batch=1 fits "
                        f"({gib(more.total_bytes)} per GPU)")
    return "the model states alone exceed the GPUs; use GPUs with more memory"


def report(plan: TrainPlan) -> str:
    m, d = plan.model, plan.data
    tokens = plan.global_batch * d.seq_len
    lines = [
        (f"model: {count(m.n_params)} parameters (largest layer {m.largest_layer / 1e6:.0f} M), hidden {m.hidden}, "
        f"{m.layers} layers, vocabulary {m.vocab}, {m.image_tokens} image tokens; from {m.source}"),
        f"data: {d.source}",
        (f"batch: {plan.gpus} GPUs ({plan.nodes} node{'s' if plan.nodes > 1 else ''}) x micro_batch {plan.micro_batch} "
        f"x accumulation {plan.accumulation} = global batch {plan.global_batch}; {tokens:,} tokens per step "
        f"(sequences of {d.seq_len})"),
        (f"per GPU: model states (ZeRO-3, DeepSpeed's estimator) {gib(plan.states_bytes)} + activations "
        f"{gib(plan.activation_bytes)} (gradient checkpointing {'on' if plan.grad_checkpointing else 'off'}) + logits "
        f"{gib(plan.logits_bytes)} + reserve {gib(RESERVE_BYTES)} = {gib(plan.total_bytes)} of {gib(plan.gpu_bytes)}: "
        f"{'fits' if plan.fits else 'DOES NOT FIT'}"),
    ]
    return "\n".join(lines)


def step_lines(train: TrainConfig, plan: TrainPlan) -> str:
    n = plan.data.records
    if n is None:
        return "steps: unknown until the data exists (dry_run_records=N)"
    per_epoch = n // plan.global_batch
    if per_epoch < 1:
        return f"steps: {n} records cannot fill one global batch of {plan.global_batch}"
    total = train.max_steps if train.max_steps > 0 else train.epochs * per_epoch
    return f"steps: {per_epoch} per epoch x {train.epochs} epochs = {total} optimizer steps" + (
        f" (train.max_steps={train.max_steps})" if train.max_steps > 0 else "")


def dry_run(model_cfg: Mapping[str, Any], train: TrainConfig, gpus: int, gpu_memory_gb: float, nodes: int = 1,
            records: int | None = None) -> TrainPlan:
    """Print the plan; refuse (:class:`UserError`) one that cannot run or does not fit."""
    if gpus < 1 or nodes < 1 or gpus % nodes:
        raise UserError(f"gpus={gpus} over nodes={nodes}: give a positive number of GPUs, the same on every node")
    if train.global_batch % (gpus * train.micro_batch):
        raise UserError(f"train.global_batch={train.global_batch} is not divisible by gpus={gpus} x train.micro_batch="
                        f"{train.micro_batch}; change one of them")
    model = model_facts(model_cfg)
    plan = make_plan(train, model, data_facts(train, model, records), gpus, nodes, gpu_memory_gb)
    print(report(plan))
    print(step_lines(train, plan))
    if not plan.fits:
        raise UserError(f"the plan does not fit {gpu_memory_gb:g} GB GPUs ({gib(plan.total_bytes)} per GPU); "
                        + what_to_change(plan, train))
    print("dry run: nothing loaded, nothing written")
    return plan
