"""The decode stage: prompts -> images + one record per image, in a self-describing run directory.

The files of a run dir, their crash safety and the image seeds are the contract of :mod:`core.rundir`
(``eval`` reads only those files); this module decides what to decode, checks that a run dir may be
resumed, times each image and writes its record.

Sharding: rank ``r`` of ``count`` decodes the prompts with ``idx % count == r`` and appends to its own
``samples-{r}.jsonl`` (no locks); ``eval`` merges every ``samples*.jsonl`` of the directory.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from core.errors import UserError, one_line_errors
from core.rundir import (
    CONF_DIR,
    atomic_write_bytes,
    finished,
    image_name,
    samples_name,
)
from data.prompts import Prompt, apply_limit, load_prompts
from decode import schema
from decode.identity import (  # RunDirConflict: decode.run's error since the first release
    RunDirConflict,  # noqa: F401
    check_same_config,
    config_diffs,
    prompts_fingerprint,
    weights_fingerprint,
)
from decode.loop import GenerateFn, decode_images, timed_generate  # noqa: F401 (timed_generate: bench)
from decode.ownership import check_out_dir, claim_run_dir, finished_with_images

KEY_ABBREVIATIONS = {"window": "w", "denoise_steps": "d"}  # decoder options spelled in folder names


# ---------------------------------------------------------------------------------------------------
# Shards, folder names, config composition


# (rank, world size, local rank) variables of each launcher, first match wins: torchrun, submitit's local
# launcher (hydra/launcher=submitit_local with tasks_per_node), SLURM (srun, submitit on SLURM)
LAUNCHER_ENV = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS", "SUBMITIT_LOCAL_LOCALID"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


def _launcher_env(env: Mapping[str, str]) -> tuple[int, int, str | None]:
    for rank, size, local in LAUNCHER_ENV:
        if env.get(size):
            return int(env.get(rank) or 0), int(env[size]), env.get(local)
    return 0, 1, None


def resolve_shard(index: int | None, count: int | None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size): explicit values win, else the launcher's variables (:data:`LAUNCHER_ENV`), else (0, 1)."""
    rank, size, _ = _launcher_env(os.environ if env is None else env)
    count = size if count is None else count
    index = rank if index is None else index
    if not 0 <= int(index) < int(count):
        raise ValueError(f"shard.index={index} is outside [0, shard.count={count}); fix shard.index/shard.count")
    return int(index), int(count)


def select_local_gpu(env: Mapping[str, str] | None = None) -> int | None:
    """Make ``cuda`` mean this process's GPU under torchrun, submitit or SLURM (their local rank)."""
    _, _, local = _launcher_env(os.environ if env is None else env)
    if local is None or not torch.cuda.is_available():
        return None
    index = int(local) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return index


def _short(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def run_key(decoder: Any, sampling: Any) -> str:
    """Folder-name tag of a decoder + sampling setting, e.g. ``sjd2_w96_d25_cfg3-1a2b3c``.

    Key options are spelled out; the 6-hex hash covers every option, so sweeps never share a folder.
    """
    dec = OmegaConf.to_container(decoder, resolve=True) if isinstance(decoder, DictConfig) else dict(decoder)
    smp = OmegaConf.to_container(sampling, resolve=True) if isinstance(sampling, DictConfig) else dict(sampling)
    parts = [str(dec.get("name", "decoder"))]
    parts += [f"{short}{_short(dec[k])}" for k, short in KEY_ABBREVIATIONS.items() if dec.get(k) is not None]
    parts.append(f"cfg{_short(smp.get('cfg_scale'))}")
    if smp.get("temperature", 1.0) != 1.0:
        parts.append(f"t{_short(smp['temperature'])}")
    if smp.get("top_k", 0):
        parts.append(f"k{smp['top_k']}")
    if smp.get("top_p", 1.0) != 1.0:
        parts.append(f"p{_short(smp['top_p'])}")
    digest = hashlib.sha1(json.dumps([dec, smp], sort_keys=True, default=str).encode()).hexdigest()[:6]
    return "_".join(parts) + "-" + digest


OmegaConf.register_new_resolver("run_key", run_key, replace=True)
# the default out_dir of a batched run: its own folder (batch_size is part of a run's identity)
OmegaConf.register_new_resolver("batch_tag", lambda b: "" if b in (None, 1) else f"_b{b}", replace=True)
schema.register()


# ---------------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class RunSummary:
    """What one invocation did."""

    out_dir: Path
    shard: tuple[int, int]  # (index, count)
    n_images: int  # images this shard owns
    n_skipped: int  # already finished before this invocation
    n_decoded: int  # decoded now


def _todo(prompts: list[Prompt], per_prompt: int, shard: tuple[int, int],
          done: set[tuple[int, int]]) -> tuple[list[tuple[Prompt, int]], int]:
    index, count = shard
    mine = [(p, j) for p in prompts if p.idx % count == index for j in range(per_prompt)]
    return [(p, j) for p, j in mine if (p.idx, j) not in done], len(mine)


def write_geneval_folder(run_dir: Path, prompts: list[Prompt], per_prompt: int) -> int:
    """GenEval's folder contract: ``geneval/{idx:05d}/metadata.jsonl`` + ``samples/{j:04d}.png`` (hard links).

    Only prompts whose images are all finished are laid out. Returns the number of prompt folders.
    """
    done, n = finished(run_dir), 0
    for p in prompts:
        if not all((p.idx, j) in done for j in range(per_prompt)):
            continue
        folder = run_dir / "geneval" / f"{p.idx:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        meta = dict(p.meta) if p.meta else {"prompt": p.prompt, "tag": p.category}
        atomic_write_bytes(folder / "metadata.jsonl", (json.dumps(meta) + "\n").encode())
        for j in range(per_prompt):
            src, dst = run_dir / image_name(p.idx, j, per_prompt), folder / "samples" / f"{j:04d}.png"
            tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
            try:
                os.link(src, tmp)
            except OSError:
                tmp.write_bytes(src.read_bytes())
            os.replace(tmp, dst)
        n += 1
    return n


def check_trained_for(conf: Mapping[str, Any], adapter: Any) -> None:
    """``sjd2`` needs a model fine-tuned for it: one without an SJD2 recipe is refused unless told."""
    dec = conf["decoder"]
    if dec.get("name") == "sjd2" and not dec.get("allow_untrained") and adapter.trained_recipe() is None:
        raise UserError(f"model={conf['model'].get('name')} was never fine-tuned for SJD2 (it carries no sjd2.json "
                        "recipe): use model=tiny_sjd2 or your `make finetune` export, or pass "
                        "decoder.allow_untrained=true to decode with it anyway")
    if dec.get("name") == "sjd2":  # noise options that differ from the model's training: refused now, not later
        from decode.sjd2 import decoding_noise

        opts = {k: v for k, v in vars(schema.check_decoder(dec)).items() if k not in schema.STAGE_OPTIONS}
        decoding_noise(adapter, opts.pop("denoise_steps"), opts.pop("check_trained_noise"), **opts)


def context_length(adapter: Any) -> int | None:
    """The model's number of positions (its text config's ``max_position_embeddings``), None if unknown."""
    config = getattr(getattr(adapter, "model", None), "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def check_prompt_lengths(prompts: list[Prompt], adapter: Any, model_name: Any) -> None:
    """Every prompt plus the image sequence must fit the model's positions (checked before writing)."""
    limit = context_length(adapter)
    if limit is None:
        return
    n_image = adapter.layout.n_tokens
    for p in prompts:
        n_prompt = len(adapter.prompt_ids(p.prompt))
        if n_prompt + n_image > limit:
            raise UserError(f"prompt idx {p.idx} is {n_prompt} tokens: with the {n_image} image tokens that is "
                            f"{n_prompt + n_image} positions, more than model={model_name} has ({limit}); "
                            "shorten it or remove it from the prompt file")


def decode_run(cfg: DictConfig | Mapping[str, Any], *, adapter: Any = None,
               generate_fn: GenerateFn | None = None) -> RunSummary:
    """Decode every unfinished image of this shard into ``cfg.out_dir`` (see the module docstring).

    ``adapter`` / ``generate_fn`` default to ``models.load_adapter(cfg.model)`` and
    ``decode.api.generate``; tests pass their own.
    """
    from decode.sampling import SamplingConfig

    conf = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    all_prompts = load_prompts({**conf["prompts"], "limit": None})  # read once: fingerprinted whole, then cut
    conf["fingerprint"] = {"prompts": prompts_fingerprint(all_prompts), "weights": weights_fingerprint(conf["model"])}
    # 1. Check everything that can be wrong before anything is written: prompts, sampling, decoder, the
    #    out_dir, the run dir's configuration and (when there is work) the model.
    schema.check_counts(conf)
    prompts = apply_limit(all_prompts, conf["prompts"].get("limit"))
    per_prompt = int(conf["prompts"].get("images_per_prompt", 1))
    sampling = SamplingConfig(**conf["sampling"])
    schema.check_decoder(conf["decoder"])
    if generate_fn is None:
        from decode.api import generate as generate_fn
    shard_cfg = conf.get("shard") or {}
    shard = resolve_shard(shard_cfg.get("index"), shard_cfg.get("count"))
    run_dir = check_out_dir(conf["out_dir"])  # a new, empty or run dir; never a user's folder or the checkout
    force = bool(conf["force"])
    if not force:
        check_same_config(run_dir, conf)
    # the work list as it will be once the run dir is taken: force on another configuration starts it over
    fresh = not run_dir.is_dir() or (force and bool(config_diffs(run_dir, conf)))
    todo_all, _ = _todo(prompts, per_prompt, shard, set() if fresh else finished_with_images(run_dir))

    def load_and_check(todo: list[tuple[Prompt, int]]) -> None:
        nonlocal adapter
        if adapter is None:
            from models import load_adapter

            select_local_gpu()
            adapter = load_adapter(conf["model"])
        check_trained_for(conf, adapter)
        check_prompt_lengths(list({p.idx: p for p, _ in todo}.values()), adapter, conf["model"].get("name"))

    checked = bool(todo_all)
    if checked:
        load_and_check(todo_all)
    # 2. Take the run dir (decode/ownership.py): locks, force's move, config.yaml, torn line, missing images.
    records_path = run_dir / samples_name(*shard)
    with claim_run_dir(run_dir, conf, force, records_path, shard):  # holds this shard's lock until decoded
        todo_all, n_mine = _todo(prompts, per_prompt, shard, finished(run_dir))  # after the move and repairs
        max_images = conf.get("max_images")
        todo = todo_all if max_images is None else todo_all[: int(max_images)]
        # 3. Decode.
        n_decoded = 0
        if todo:
            if not checked:  # work that appeared meanwhile (an image deleted since): the model is needed
                load_and_check(todo)
            n_decoded = decode_images(conf, todo, run_dir, records_path, shard, per_prompt, sampling, adapter,
                                      generate_fn)
    if conf["prompts"].get("geneval_folder"):
        write_geneval_folder(run_dir, [p for p in prompts if p.idx % shard[1] == shard[0]], per_prompt)
    return RunSummary(run_dir, shard, n_images=n_mine, n_skipped=n_mine - len(todo_all), n_decoded=n_decoded)


@one_line_errors
def _run_and_report(cfg: DictConfig) -> None:
    if cfg.get("dry_run"):
        from decode.dryrun import dry_run

        conf = OmegaConf.to_container(cfg, resolve=True)
        shard = conf.get("shard") or {}
        dry_run(conf, resolve_shard(shard.get("index"), shard.get("count")))
        return
    summary = decode_run(cfg)
    print(f"{summary.out_dir}: {summary.n_decoded} decoded, {summary.n_skipped} already there, "
          f"{summary.n_images} in shard {summary.shard[0]}/{summary.shard[1]}")


def main() -> None:
    """The Hydra command line of the stage (``python -m decode`` and ``python -m decode.run``)."""
    import hydra

    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="decode")(_run_and_report)()


if __name__ == "__main__":  # `python -m decode.run ...` == `python -m decode ...` (DESIGN.md section 1)
    main()
