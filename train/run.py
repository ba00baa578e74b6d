"""The train stage: ``python -m train model=tiny train=sjd2_tiny [overrides]`` (Hydra, ``conf/train.yaml``).

A thin wrapper over :func:`train.loop.fit`: compose the config, load the adapter and the training records,
hand them to the loop. One process runs plain PyTorch; under ``torchrun`` (``launch/finetune.sh``) every
rank runs this same entry point and the loop switches to DeepSpeed ZeRO-3.

Run dir (``run_dir``, fixed per model + recipe so a restart resumes it): ``config.yaml`` (resolved),
``env.json``, ``loss.csv`` + ``loss.png``, ``checkpoints/`` (``latest`` + ``step_XXXXXXX/``), and the
exported weights in ``train.export_dir`` (default ``<run_dir>/export``; ``make tiny-sjd2`` passes the committed path).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from core.config import check_device_dtype, compose_config, flatten
from core.errors import UserError, one_line_errors
from core.rundir import CONF_DIR, check_own_folder, config_has_keys, some_names
from train.config import DATA_SOURCES, DataConfig, train_config_from_dict
from train.loop import FitResult, fit
from train.schema import register

register()


class ShardRecords:
    """``(input_ids, prompt_len)`` view of a ``datasets`` dataset (``train/data.py`` shards)."""

    def __init__(self, ds: Any, limit: int | None = None):
        missing = {"input_ids", "prompt_len"} - set(ds.column_names)
        if missing:
            raise ValueError(f"training shards lack columns {sorted(missing)}; re-create them with `python -m train.data`")
        self.ds = ds.select(range(min(limit, len(ds)))) if limit is not None else ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        row = self.ds[int(i)]
        return row["input_ids"], int(row["prompt_len"])


def shapes_records(adapter: Any, n: int, seed: int) -> list[tuple[list[int], int]]:
    """``n`` shapes examples (example i = ``shapes.example(seed, i)``) tokenised by the adapter."""
    from data import shapes

    if not hasattr(adapter, "prompt_ids") or getattr(adapter, "vq", None) is None:
        raise ValueError(
            f"train.data.source=shapes needs a model with the shapes tokenizer (tiny); model {adapter.name!r} "
            "has none. Tokenise images with `python -m train.data` and use train.data.source=shards"
        )
    out = []
    for i in range(n):
        caption, _, scene = shapes.example(seed, i)
        image_ids = adapter.encode_image(shapes.render(scene, int(adapter.image_size)))
        prompt = list(adapter.prompt_ids(caption))
        out.append((prompt + [int(t) for t in image_ids.tolist()], len(prompt)))
    return out


def random_records(adapter: Any, n: int, seed: int) -> list[tuple[list[int], int]]:
    """``n`` records of uniformly random image codes under shapes captions (dry runs and tests: no image
    tokenizer and no data needed; measures memory/throughput of a real model before its data exists)."""
    from data import shapes

    layout, out = adapter.layout, []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        caption, _, _ = shapes.sample_example(rng)
        grid = torch.from_numpy(rng.integers(layout.code_start, layout.code_stop, (layout.height, layout.width)))
        prompt = list(adapter.prompt_ids(caption))
        out.append((prompt + layout.sequence(grid).tolist(), len(prompt)))
    return out


def load_records(adapter: Any, data: DataConfig) -> Sequence[tuple[Sequence[int], int]]:
    """The training records ``train.data`` names."""
    if data.source == "shapes":
        n = data.n_examples if data.limit is None else min(data.n_examples, data.limit)
        return shapes_records(adapter, n, data.seed)
    if data.source == "random":
        n = data.n_examples if data.limit is None else min(data.n_examples, data.limit)
        return random_records(adapter, n, data.seed)
    if data.source == "shards":
        from models import resolve_path
        from train.data import load_shards

        if not data.path:
            raise ValueError("train.data.source=shards needs train.data.path (a folder written by `python -m train.data`)")
        path = resolve_path(data.path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"training data folder {path} does not exist; create it with "
                "`python -m train.data model=<model> source=<images> out_dir=<folder>` and set train.data.path"
            )
        return ShardRecords(load_shards(path), data.limit)
    raise ValueError(f"unknown train.data.source {data.source!r}; pick one of {DATA_SOURCES}")


def wandb_logger(wcfg: DictConfig, run_dir: Path, config: dict) -> tuple[Callable | None, Callable[[], None]]:
    """(log(row, step), finish()) for wandb on rank 0; no-ops when ``wandb.mode: disabled``."""
    if wcfg.mode == "disabled" or int(os.environ.get("RANK", "0")) != 0:
        return None, lambda: None
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / "wandb_id.txt"  # the same wandb run continues after a resume
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    run = wandb.init(mode=wcfg.mode, project=wcfg.project, entity=wcfg.entity, name=wcfg.name, id=run_id,
                     resume="allow", dir=str(run_dir), config=config)
    return (lambda row, step: run.log(row, step=step)), run.finish


def model_config_for_rank(model_cfg: dict) -> dict:
    """Under torchrun each rank loads its model onto its own GPU (``cuda`` -> ``cuda:$LOCAL_RANK``)."""
    device = str(model_cfg["device"])  # every conf/model/*.yaml states it
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device == "cuda":
        return {**model_cfg, "device": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"}
    return model_cfg


# settings a resumed run may change: they neither change the model nor the schedule
RESUME_FREE = {"train.log_every", "train.ckpt_every", "train.keep_checkpoints", "train.stop_after_steps",
               "train.export_dir", "model.device"}
TRAIN_DIR_KEYS = frozenset({"model", "train"})  # a training run's config.yaml has both


def check_train_dir(run_dir: Path) -> None:
    """Refuse, before anything is written, a run_dir training may not write into: the folder the command runs
    from, the checkout, a folder holding either, a file, or a folder with files of its own that is not a
    training run dir (no ``config.yaml`` with :data:`TRAIN_DIR_KEYS`). A new or empty folder, or an earlier
    run of this stage (resumed, see :func:`check_resume`), is fine."""
    check_own_folder(run_dir, f"run_dir={run_dir}")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not config_has_keys(run_dir, TRAIN_DIR_KEYS):
        raise UserError(f"run_dir={run_dir} holds files of its own ({some_names(sorted(p.name for p in run_dir.iterdir()))}) "
                        "and is not a training run dir (no config.yaml of a training run): training writes only into "
                        "a new or empty folder or its own earlier run dir; pick another run_dir=...")


def check_resume(run_dir: Path, resolved: dict, resume: bool, allow_change: bool) -> None:
    """Refuse to continue a run dir trained with another model or schedule-affecting options (steps, lr,
    batch, data, noise...), before any file is written; ``allow_resume_change=true`` accepts it."""
    old_file = run_dir / "config.yaml"
    if not resume or allow_change or not old_file.is_file():
        return
    old = OmegaConf.to_container(OmegaConf.load(old_file), resolve=False)
    a, b = flatten({k: old.get(k) for k in ("model", "train")}), flatten({k: resolved.get(k) for k in ("model", "train")})
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if k not in RESUME_FREE and a.get(k) != b.get(k)]
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise UserError(f"run_dir={run_dir} was trained with other settings ({shown}); resuming would continue "
                        "its checkpoint under the new ones. Pick another run_dir=..., or pass "
                        "allow_resume_change=true to resume anyway")


@one_line_errors
def _main(cfg: DictConfig) -> None:
    run(cfg)


def run(cfg: DictConfig) -> FitResult | None:
    """The stage as a function (tests call it with a composed config); ``dry_run=true``: the plan only."""
    from models import load_adapter

    resolved = OmegaConf.to_container(cfg, resolve=True)
    train_cfg = train_config_from_dict(resolved["train"])
    if resolved.get("dry_run"):
        from train.dryrun import dry_run

        gpus = resolved.get("gpus") or int(os.environ.get("WORLD_SIZE", "1"))
        dry_run(resolved["model"], train_cfg, gpus, float(resolved["gpu_memory_gb"]), int(resolved["nodes"]),
                resolved.get("dry_run_records"))
        return None
    run_dir = Path(cfg.run_dir)
    model_cfg = model_config_for_rank(resolved["model"])
    check_device_dtype(model_cfg)
    check_train_dir(run_dir)
    check_resume(run_dir, resolved, bool(cfg.resume), bool(cfg.allow_resume_change))
    if train_cfg.data.source == "shapes" and resolved["model"].get("family") != "tiny":
        raise UserError(f"train.data.source=shapes is the embedded shapes world, made for the tiny models' VQ; "
                        f"model={resolved['model'].get('name')} needs its own data: train.data.source=shards "
                        "train.data.path=<python -m train.data output> (or source=random for a dry run)")
    adapter = load_adapter(model_cfg)
    records = load_records(adapter, train_cfg.data)
    if int(os.environ.get("RANK", "0")) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    log, finish = wandb_logger(cfg.wandb, run_dir, resolved)
    try:
        return fit(adapter, records, train_cfg, run_dir, resume=bool(cfg.resume), progress=bool(cfg.progress),
                   logger=log)
    finally:
        finish()


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/train.yaml`` composed with Hydra overrides, outside a Hydra app (tests)."""
    return compose_config(overrides, config_name="train")


def main() -> None:
    import hydra

    hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()
