"""Every config in conf/ composes (Hydra compose API), resolves, and names things the code knows."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import decode.run  # noqa: F401  (registers the run_key resolver that out_dir uses)
from core.config import compose_config
from core.rundir import CONF_DIR

PRIMARIES = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def _default_groups(primary: str) -> list[str]:
    """Config groups named in a primary config's defaults list (hydra/* overrides excluded)."""
    defaults = yaml.safe_load((CONF_DIR / f"{primary}.yaml").read_text()).get("defaults", [])
    groups = []
    for entry in defaults:
        if isinstance(entry, dict):
            key = next(iter(entry))
            if not key.startswith("override") and (CONF_DIR / key).is_dir():
                groups.append(key)
    return groups


CASES = [(primary, group, option.stem) for primary in PRIMARIES for group in _default_groups(primary)
         for option in sorted((CONF_DIR / group).glob("*.yaml"))]
USED_GROUPS = {g for _, g, _ in CASES}


def _resolved(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("primary", PRIMARIES)
def test_primary_config_composes_with_its_defaults(primary):
    assert _resolved(compose_config([], config_name=primary))


@pytest.mark.parametrize("primary, group, option", CASES, ids=[f"{p}:{g}={o}" for p, g, o in CASES])
def test_every_group_option_composes(primary, group, option):
    cfg = _resolved(compose_config([f"{group}={option}"], config_name=primary))
    assert cfg[group], f"{group}={option} composed to nothing"


def test_configs_outside_the_primaries_parse():
    """Groups no primary config names yet (e.g. conf/train/ before conf/train.yaml) must still load."""
    for d in CONF_DIR.iterdir():
        if d.is_dir() and d.name not in USED_GROUPS:
            for path in d.glob("*.yaml"):
                assert OmegaConf.load(path) is not None, path


def test_decode_config_names_what_the_code_knows():
    from data.prompts import LOADERS
    from decode.api import resolve_decoder
    from decode.sampling import SamplingConfig
    from models import _LOADERS

    cfg = _resolved(compose_config([]))
    assert set(cfg["sampling"]) == {f.name for f in dataclasses.fields(SamplingConfig)}
    SamplingConfig(**cfg["sampling"])
    for option in sorted((CONF_DIR / "decoder").glob("*.yaml")):
        resolve_decoder(_resolved(compose_config([f"decoder={option.stem}"]))["decoder"])
    for option in sorted((CONF_DIR / "model").glob("*.yaml")):
        assert _resolved(compose_config([f"model={option.stem}"]))["model"]["family"] in _LOADERS
    for option in sorted((CONF_DIR / "prompts").glob("*.yaml")):
        assert _resolved(compose_config([f"prompts={option.stem}"]))["prompts"]["kind"] in LOADERS


def test_sampling_defaults_follow_the_model_and_stay_overridable():
    assert compose_config(["model=tiny"]).sampling.top_k == 0
    lumina = CONF_DIR / "model" / "lumina_mgpt_768.yaml"
    if "sampling_defaults" in OmegaConf.load(lumina):
        want = OmegaConf.load(lumina).sampling_defaults.top_k
        assert compose_config(["model=lumina_mgpt_768"]).sampling.top_k == want
    assert compose_config(["model=lumina_mgpt_768", "sampling.top_k=5"]).sampling.top_k == 5


def test_eval_suites_list_known_metrics():
    from eval.run import METRICS

    for option in sorted((CONF_DIR / "eval").glob("*.yaml")):
        metrics = _resolved(compose_config([f"eval={option.stem}"], config_name="eval"))["eval"]["metrics"]
        assert metrics and set(metrics) <= set(METRICS), option


def test_default_out_dirs_differ_for_every_decoder_config():
    decoders = sorted(p.stem for p in (CONF_DIR / "decoder").glob("*.yaml"))
    cfgs = {d: _resolved(compose_config([f"decoder={d}"])) for d in decoders}
    by_dir: dict[str, dict] = {}
    for d, cfg in cfgs.items():
        same = by_dir.setdefault(cfg["out_dir"], cfg)
        assert (same["decoder"], same["sampling"]) == (cfg["decoder"], cfg["sampling"]), \
            f"decoder={d} shares {cfg['out_dir']} with a different setting"
    assert Path(cfgs["ar"]["out_dir"]).parts[:3] == ("runs", "tiny", "shapes")
