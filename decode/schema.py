"""Typed configs of the decode stage, registered with Hydra's ConfigStore.

``conf/decode.yaml`` extends :class:`DecodeStage` and every ``conf/decoder/<name>.yaml`` extends its
decoder's options class (``defaults: [<name>_schema, _self_]``), so Hydra refuses a wrong type
(``decoder.window=abc``) or an unknown option (``decoder.windw=8``) while it composes the config,
naming the option, before any file is written. :func:`check_decoder` then builds the options object,
whose ``__post_init__`` checks the values (``decoder.window=0``) with the decoder's own rules.

The YAML files hold every default a user sees; the field defaults here only mirror them so that the
classes also work from code.
"""
from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from decode.sampling import SamplingConfig


@dataclass
class ArOptions:
    """``decoder=ar``: plain autoregressive decoding, one token per forward; no options."""

    name: str = "ar"


@dataclass
class SjdOptions:
    """``decoder=sjd`` (conf/decoder/sjd.yaml documents each option)."""

    name: str = "sjd"
    window: int = 16
    init: str = "random"
    jacobi_region: str = "image"
    coupling: str = "none"
    coupled_q: str = "target"
    acceptance: str = "exact"
    group_half_width: int = 7
    group_p_thr: float = 0.15
    group_d_thr: float = 0.5

    def __post_init__(self) -> None:
        from decode import sjd

        sjd.validate_options(**{k: v for k, v in vars(self).items() if k != "name"})


@dataclass
class ScdOptions(SjdOptions):
    """``decoder=scd``: SJD with coupled redrafts (conf/decoder/scd.yaml)."""

    name: str = "scd"
    coupling: str = "maximal"


@dataclass
class GsdOptions(SjdOptions):
    """``decoder=gsd``: SJD with GSD's grouped acceptance, lossy (conf/decoder/gsd.yaml)."""

    name: str = "gsd"
    acceptance: str = "grouped"


@dataclass
class Sjd2Options:
    """``decoder=sjd2`` (conf/decoder/sjd2.yaml documents each option and its provenance)."""

    name: str = "sjd2"
    window: int = 96
    denoise_steps: int = 25
    init_levels: str = "staircase"
    init_latent: str = "prior_mean"
    x0: str = "sample"
    draft_q: str = "sampled"
    accept_only_clean_inputs: bool = False
    coupling: str = "none"
    coupled_q: str = "target"
    timestep_signal: str = "reserved_token"
    signal_levels: int | None = None
    schedule: str = "rectified_flow"
    spacing: str = "karras"
    rho: float = 7.0
    t_min: float = 0.01
    t_max: float = 1.0
    jacobi_region: str = "image"
    check_trained_noise: bool = True
    allow_untrained: bool = False  # the decode stage's check, not the decoder function's (STAGE_OPTIONS)
    signal: Any = None  # code only: an explicit timestep-signal callable

    def __post_init__(self) -> None:
        from decode import sjd2

        sjd2.validate_options(self.window, self.init_levels, self.draft_q, self.init_latent, self.jacobi_region,
                              self.coupling, self.coupled_q)
        sjd2.noise_config(**vars(self))  # the noise options as the NoiseConfig training used


@dataclass
class SjdPacOptions:
    """``decoder=sjd_pac`` (conf/decoder/sjd_pac.yaml documents each option and its provenance)."""

    name: str = "sjd_pac"
    window: int = 64
    tree_width: int = 3
    tree_depth: int = 3
    continuation: bool = True
    jacobi_region: str = "image"

    def __post_init__(self) -> None:
        from decode import sjd_pac

        sjd_pac.validate_options(self.window, self.tree_width, self.tree_depth, self.jacobi_region)


# options the decode stage reads itself (checked before the run dir is written); not decoder arguments
STAGE_OPTIONS = frozenset({"name", "allow_untrained"})

DECODER_OPTIONS: dict[str, type] = {"ar": ArOptions, "sjd": SjdOptions, "sjd2": Sjd2Options}
DECODER_OPTIONS.update(scd=ScdOptions, gsd=GsdOptions)
DECODER_OPTIONS["sjd_pac"] = SjdPacOptions


# The composed ``sampling:`` node: SamplingConfig's fields and types, mutable (the frozen SamplingConfig
# itself checks the values when the stage builds it).
SamplingFields = make_dataclass(
    "SamplingFields", [(f.name, typing.get_type_hints(SamplingConfig)[f.name], f.default) for f in fields(SamplingConfig)]
)


@dataclass
class ShardConfig:
    index: int | None = None
    count: int | None = None


@dataclass
class DecodeStage:
    """``conf/decode.yaml``; ``model`` / ``prompts`` / ``launcher`` are checked by their loaders."""

    model: Any = MISSING
    decoder: Any = MISSING
    prompts: Any = MISSING
    launcher: Any = None
    seed: int = 0
    out_dir: str = MISSING
    sampling: Any = field(default_factory=SamplingFields)
    shard: ShardConfig = field(default_factory=ShardConfig)
    warmup: bool = True
    batch_size: int = 1
    max_images: int | None = None
    progress: bool = True
    force: bool = False
    dry_run: bool = False
    gpu_memory_gb: float = 80.0
    dry_run_prompt_tokens: int | None = None


def check_decoder(decoder_cfg: Mapping[str, Any]) -> Any:
    """The options object of ``{"name": ..., **options}``: unknown names, options and values refused."""
    cfg = dict(decoder_cfg)
    name = cfg.get("name")
    if name not in DECODER_OPTIONS:
        raise ValueError(f"unknown decoder {name!r}; valid: {sorted(DECODER_OPTIONS)} "
                         f"(set decoder.name / decoder=<name>)")
    cls = DECODER_OPTIONS[name]
    unknown = sorted(set(cfg) - set(cls.__dataclass_fields__))
    if unknown:
        valid = [f for f in cls.__dataclass_fields__ if f != "name"]
        raise ValueError(f"unknown option(s) {unknown} for decoder {name!r}; valid options: {valid}")
    return cls(**cfg)


def check_counts(conf: Mapping[str, Any]) -> None:
    """The stage's counts and sizes (the decoder's and sampling's own classes check theirs), before any file."""
    from core.config import check_count, check_device_dtype

    prompts, shard = conf.get("prompts") or {}, conf.get("shard") or {}
    check_count("batch_size", conf.get("batch_size", 1), 1, meaning="prompts decoded together")
    check_count("max_images", conf.get("max_images"), 0, none_ok=True, meaning="new images this invocation decodes")
    check_count("prompts.limit", prompts.get("limit"), 1, none_ok=True, meaning="the first N prompts")
    check_count("prompts.images_per_prompt", prompts.get("images_per_prompt", 1), 1, meaning="images per prompt")
    if "n" in prompts:
        check_count("prompts.n", prompts.get("n"), 1, meaning="captions drawn from the set")
    check_count("shard.index", shard.get("index"), 0, none_ok=True, meaning="this process's rank")
    check_count("shard.count", shard.get("count"), 1, none_ok=True, meaning="the number of shards")
    size = (conf.get("model") or {}).get("image_size")
    if size is not None:
        check_count("model.image_size", size, 1, meaning="pixels per side")
    if not conf.get("dry_run"):  # a plan is for the GPUs of another machine
        check_device_dtype(conf.get("model") or {})


def register() -> None:
    """Make the schemas known to Hydra (idempotent; called when decode.run is imported)."""
    cs = ConfigStore.instance()
    cs.store(name="decode_schema", node=DecodeStage)
    for name, cls in DECODER_OPTIONS.items():
        cs.store(group="decoder", name=f"{name}_schema", node=cls)
