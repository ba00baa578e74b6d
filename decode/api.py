"""One entry point over every decoder: ``generate(adapter, text, decoder_cfg, sampling, generator)``.

``decoder_cfg`` is a ``conf/decoder/*.yaml`` mapping: ``name`` picks the decoder from :data:`DECODERS`,
every other key is a keyword-only option of that decoder function (the YAML field names equal the
keyword names). Every decoder has the signature
``fn(adapter, prefill, sampling, generator, **options) -> DecodeResult``.

CFG rule: the prompt gets the unconditional stream iff ``sampling.cfg_scale != 1.0`` -- at scale 1 the
guided logits equal the conditional ones, so the second stream would only cost compute.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import fields
from typing import Any

import torch

from decode.ar import ar_decode, ar_steps
from decode.batch import Finished, run_batched
from decode.result import DecodeResult
from decode.sampling import SamplingConfig
from decode.schema import STAGE_OPTIONS, check_decoder
from decode.sjd import sjd_decode, sjd_steps
from models.base import ModelAdapter


class LazyDecoder:
    """A decoder given as ``"module:function"``, imported on first use (keeps optional decoders optional)."""

    def __init__(self, target: str):
        self.target = target
        self._fn: Callable[..., DecodeResult] | None = None

    def resolve(self) -> Callable[..., DecodeResult]:
        if self._fn is None:
            module, name = self.target.split(":")
            self._fn = getattr(importlib.import_module(module), name)
        return self._fn

    def __call__(self, *args: Any, **kwargs: Any) -> DecodeResult:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"LazyDecoder({self.target!r})"


DECODERS: dict[str, Callable[..., DecodeResult]] = {
    "ar": ar_decode,
    "sjd": sjd_decode,
    "sjd2": LazyDecoder("decode.sjd2:sjd2_decode"),
    "sjd_pac": LazyDecoder("decode.sjd_pac:sjd_pac_decode"),
}
DECODERS.update(scd=sjd_decode, gsd=sjd_decode)  # SCD and GSD: the SJD loop with coupling / grouped acceptance

# the same decoders as step coroutines (decode.batch), for batched decoding
STEPS: dict[str, Callable[..., Any]] = {
    "ar": ar_steps,
    "sjd": sjd_steps,
    "sjd2": LazyDecoder("decode.sjd2:sjd2_steps"),
    "sjd_pac": LazyDecoder("decode.sjd_pac:sjd_pac_steps"),
}
STEPS.update(scd=sjd_steps, gsd=sjd_steps)


def resolve_decoder(decoder_cfg: Mapping[str, Any], steps: bool = False) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``{"name": ..., **options}`` -> (decoder function, its keyword options), validated by the decoder's
    typed options (:mod:`decode.schema`); ``steps``: its step coroutine (:data:`STEPS`) instead."""
    options = check_decoder(decoder_cfg)
    fn = (STEPS if steps else DECODERS)[options.name]
    if isinstance(fn, LazyDecoder):
        fn = fn.resolve()
    return fn, {f.name: getattr(options, f.name) for f in fields(options) if f.name not in STAGE_OPTIONS}


def generate(
    adapter: ModelAdapter,
    text: str,
    decoder_cfg: Mapping[str, Any],
    sampling: SamplingConfig,
    generator: torch.Generator,
) -> DecodeResult:
    """Decode one image sequence for ``text`` with the decoder ``decoder_cfg["name"]``."""
    fn, options = resolve_decoder(decoder_cfg)
    prefill = adapter.prompt(text, cfg=sampling.cfg_scale != 1.0)
    return fn(adapter, prefill, sampling, generator, **options)


def generate_batch(
    adapter: ModelAdapter,
    items: Iterable[tuple[Any, str, int]],
    decoder_cfg: Mapping[str, Any],
    sampling: SamplingConfig,
    batch_size: int,
) -> Iterator[Finished]:
    """Decode ``items`` = (key, text, seed) ``batch_size`` at a time (:func:`decode.batch.run_batched`): each
    image with its own generator seeded from its seed, exactly as :func:`generate` would decode it alone;
    yields :class:`decode.batch.Finished` rows as they finish."""
    fn, options = resolve_decoder(decoder_cfg, steps=True)
    cfg = sampling.cfg_scale != 1.0

    def jobs() -> Iterator[tuple[Any, Any]]:
        for key, text, seed in items:
            generator = torch.Generator(device=adapter.device).manual_seed(seed)
            yield key, fn(adapter, adapter.prompt(text, cfg=cfg), sampling, generator, **options)

    yield from run_batched(adapter, jobs(), batch_size)


__all__ = ["DECODERS", "STEPS", "DecodeResult", "LazyDecoder", "SamplingConfig", "generate", "generate_batch",
           "resolve_decoder"]
