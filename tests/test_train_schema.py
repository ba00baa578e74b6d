"""Typed train config (train/schema.py): a wrong type or an unknown option fails while composing and names
the option; a bad value stops before the run dir holds anything."""

import subprocess
import sys
from pathlib import Path

import pytest

from core.config import STAGE_MODULES, compose_config
from core.rundir import CONF_DIR
from train.config import TrainConfig, train_config_from_dict

REPO = Path(__file__).resolve().parents[1]


def test_compose_config_imports_the_train_stage_for_its_schema():
    assert STAGE_MODULES["train"] == "train.run"


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONF_DIR / "train").glob("*.yaml")))
def test_every_train_recipe_composes_to_a_train_config(recipe):
    from omegaconf import OmegaConf

    conf = compose_config([f"train={recipe}"], config_name="train")
    cfg = train_config_from_dict(OmegaConf.to_container(conf.train, resolve=True))
    assert isinstance(cfg, TrainConfig) and cfg.name == conf.train.name


@pytest.mark.parametrize("overrides, option", [
    (["train.micro_batch=abc"], "train.micro_batch"),
    (["train.optim.lr=fast"], "train.optim.lr"),
    (["train.optim.betas=[a,0.9]"], "train.optim.betas"),
    (["train.noise.levels=many"], "train.noise.levels"),
    (["train.layout.clean_share=x"], "train.layout.clean_share"),
    (["train.data.limit=all"], "train.data.limit"),
    (["resume=maybe"], "resume"),
    (["train.optim.lrr=1"], "train.optim.lrr"),
    (["train.epoch=2"], "train.epoch"),
])
def test_wrong_types_and_unknown_options_fail_while_composing(overrides, option):
    with pytest.raises(Exception) as err:
        compose_config(overrides, config_name="train")
    text = str(err.value) + str(err.value.__cause__)
    assert option in text, text


def test_a_bad_value_stops_before_the_run_dir_holds_anything(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "train", "model=tiny_random", f"run_dir={out}",
                          "train.optim.schedule=sometimes"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode != 0
    assert "unknown lr schedule 'sometimes'" in res.stderr, res.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())
