"""``python -m decode ... dry_run=true batch_size=16 gpu_memory_gb=80``: the plan of a decode run before it
runs: how many images and shards, the weights, the KV cache and logits of one row at the chosen window, and
whether ``batch_size`` rows fit one GPU. No weights are read, no run dir is made (:mod:`models.meta`).

Per row (one prompt; two streams with classifier-free guidance): the KV cache of every position a row can
reach (prompt + image sequence + the decoder's window), the window's logits (16-bit from the model, a
float32 copy and its probabilities: ``dtype + 8`` bytes per vocabulary entry) and one layer's transient
activations. The prompt length is assumed (:data:`PROMPT_TOKENS`) unless ``dry_run_prompt_tokens`` says it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.errors import UserError
from models.meta import ModelFacts, count, dtype_bytes, gib, model_facts

RESERVE_BYTES = 2 * 2**30  # CUDA context, allocator slack, the image codec's decode of one image
PROMPT_TOKENS = 128


@dataclass(frozen=True)
class DecodePlan:
    model: ModelFacts
    batch_size: int
    window: int
    streams: int
    positions: int  # per stream: prompt + image tokens + window
    weight_bytes: float
    kv_row_bytes: float
    logits_row_bytes: float
    act_row_bytes: float
    gpu_bytes: float

    @property
    def row_bytes(self) -> float:
        return self.kv_row_bytes + self.logits_row_bytes + self.act_row_bytes

    def total_bytes(self, batch_size: int | None = None) -> float:
        return self.weight_bytes + (batch_size or self.batch_size) * self.row_bytes + RESERVE_BYTES

    @property
    def max_batch(self) -> int:
        return max(0, int((self.gpu_bytes - self.weight_bytes - RESERVE_BYTES) // self.row_bytes))


def decoder_window(decoder: Mapping[str, Any]) -> int:
    """Tokens one forward of the decoder feeds per stream (AR: 1; draft trees: their node budget)."""
    for key in ("window", "tree_size", "max_nodes"):
        if decoder.get(key):
            return int(decoder[key])
    return 1


def make_plan(conf: Mapping[str, Any], model: ModelFacts, prompt_tokens: int) -> DecodePlan:
    b = dtype_bytes(conf["model"].get("dtype", "bfloat16"))
    window = decoder_window(conf["decoder"])
    streams = 1 if float(conf["sampling"]["cfg_scale"]) == 1.0 else 2
    positions = prompt_tokens + model.image_tokens + window
    kv = streams * model.layers * 2 * model.kv_heads * model.head_dim * b * positions
    logits = streams * window * model.vocab * (b + 8)
    act = streams * window * (3 * model.intermediate + 4 * model.hidden) * b
    return DecodePlan(model=model, batch_size=int(conf.get("batch_size", 1)), window=window, streams=streams,
                      positions=positions, weight_bytes=model.n_params * b, kv_row_bytes=kv, logits_row_bytes=logits,
                      act_row_bytes=act, gpu_bytes=float(conf.get("gpu_memory_gb", 80)) * 2**30)


def images_line(conf: Mapping[str, Any], shard: tuple[int, int]) -> str:
    from data.prompts import apply_limit, load_prompts

    per_prompt = int(conf["prompts"].get("images_per_prompt", 1))
    index, count = shard
    try:
        n = len(apply_limit(load_prompts({**conf["prompts"], "limit": None}), conf["prompts"].get("limit")))
    except (OSError, ValueError) as err:
        return f"images: unknown ({str(err).splitlines()[0]}); {count} shard(s)"
    total = n * per_prompt
    mine = len([i for i in range(n) if i % count == index]) * per_prompt
    return f"images: {n} prompts x {per_prompt} = {total}; {count} shard(s), shard {index} decodes {mine}"


def report(plan: DecodePlan, conf: Mapping[str, Any], shard: tuple[int, int]) -> str:
    m = plan.model
    lines = [
        (f"model: {count(m.n_params)} parameters, {m.layers} layers, {m.kv_heads} KV heads x {m.head_dim}, "
        f"vocabulary {m.vocab}, {m.image_tokens} image tokens; from {m.source}"),
        images_line(conf, shard),
        (f"decoder: {conf['decoder'].get('name')}, {plan.window} tokens per forward per stream, {plan.streams} "
        f"stream(s) per row (CFG {conf['sampling']['cfg_scale']}), {plan.positions} positions per stream"),
        (f"weights {gib(plan.weight_bytes)}; per row: KV cache {gib(plan.kv_row_bytes)} + logits "
        f"{gib(plan.logits_row_bytes)} + activations {gib(plan.act_row_bytes)} = {gib(plan.row_bytes)}"),
        (f"batch_size {plan.batch_size}: {gib(plan.total_bytes())} of {gib(plan.gpu_bytes)} (reserve {gib(RESERVE_BYTES)}): "
        f"{'fits' if plan.total_bytes() <= plan.gpu_bytes else 'DOES NOT FIT'}; at most {plan.max_batch} rows fit"),
    ]
    if plan.positions - plan.window > m.max_positions:
        lines.append(f"warning: {plan.positions - plan.window} positions exceed the model's {m.max_positions}")
    return "\n".join(lines)


def dry_run(conf: Mapping[str, Any], shard: tuple[int, int] = (0, 1)) -> DecodePlan:
    """Print the plan of the composed decode config ``conf`` (this process's ``(index, count)`` shard);
    refuse one that does not fit one GPU."""
    from decode import schema

    schema.check_counts(conf)
    schema.check_decoder(conf["decoder"])
    prompt_tokens = conf.get("dry_run_prompt_tokens") or PROMPT_TOKENS
    plan = make_plan(conf, model_facts(conf["model"]), int(prompt_tokens))
    print(report(plan, conf, shard))
    if plan.total_bytes() > plan.gpu_bytes:
        fix = (f"set batch_size={plan.max_batch}" if plan.max_batch >= 1 else
               "the weights alone do not fit: use a GPU with more memory")
        raise UserError(f"batch_size={plan.batch_size} does not fit a {float(conf.get('gpu_memory_gb', 80)):g} GB GPU "
                        f"({gib(plan.total_bytes())}); {fix}")
    print("dry run: nothing loaded, nothing written")
    return plan
