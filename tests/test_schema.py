"""Typed configs (decode/schema.py): a wrong type, option or value fails while composing or before the
run dir exists, and names the option."""

import subprocess
import sys
from pathlib import Path

import pytest

from core.config import compose_config
from core.rundir import CONF_DIR
from decode.schema import DECODER_OPTIONS, check_decoder

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "decoder").glob("*.yaml")))
def test_every_decoder_preset_composes_to_its_typed_options(preset):
    conf = compose_config([f"decoder={preset}"])
    options = check_decoder(conf.decoder)
    assert type(options) is DECODER_OPTIONS[conf.decoder.name]
    assert options.name == conf.decoder.name


@pytest.mark.parametrize("overrides, option", [
    (["decoder=sjd", "decoder.window=abc"], "decoder.window"),
    (["decoder=sjd2", "decoder.accept_only_clean_inputs=maybe"], "decoder.accept_only_clean_inputs"),
    (["seed=abc"], "seed"),
    (["sampling.top_k=x"], "sampling.top_k"),
    (["max_images=zz"], "max_images"),
    (["decoder=sjd", "decoder.windw=3"], "decoder.windw"),
])
def test_wrong_types_fail_while_composing(overrides, option):
    with pytest.raises(Exception) as err:
        compose_config(overrides)
    text = str(err.value) + str(err.value.__cause__)
    assert option in text, text


@pytest.mark.parametrize("overrides, message", [
    (["decoder=sjd", "decoder.window=0"], "decoder.window must be"),
    (["decoder=sjd2", "decoder.draft_q=nope"], "decoder.draft_q must be one of"),
    (["decoder=sjd2", "+decoder.foo=1"], "unknown option(s) ['foo']"),
    (["decoder=sjd2", "decoder.denoise_steps=0"], "levels"),
])
def test_bad_values_stop_before_the_run_dir_is_made(tmp_path, overrides, message):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "decode", "model=tiny_random", "prompts.limit=1", f"out_dir={out}",
                          *overrides], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())  # Hydra may make the empty run dir; nothing is in it


@pytest.mark.parametrize("overrides, option", [
    (["plot.enabled=maybe"], "plot.enabled"),
    (["run_dirs=3"], "run_dirs"),
    (["colour=red"], "colour"),
])
def test_eval_config_is_typed_too(overrides, option):
    with pytest.raises(Exception) as err:
        compose_config(overrides, config_name="eval")
    assert option in str(err.value) + str(err.value.__cause__)
