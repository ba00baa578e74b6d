"""``make eval-coco`` / ``make eval-geneval`` with ``DECODERS=`` (issue 19): the plan only, nothing is decoded."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.eval_suite import main, plan

CONF = Path(__file__).resolve().parents[1] / "conf"
FAMILY = ["ar", "sjd", "scd", "sjd_pac", "gsd", "sjd2"]


def decoders_of(rows):
    return [next(o.split("=", 1)[1] for o in overrides if o.startswith("decoder=")) for _, overrides in rows]


@pytest.mark.parametrize("model", ["tiny", "lumina_mgpt", "emu3"])
def test_every_family_row_is_a_decoder_config(model, tmp_path):
    rows = plan(model, "geneval", tmp_path, None, "export/", None, 0, FAMILY)
    names = decoders_of(rows)
    assert all((CONF / "decoder" / f"{n}.yaml").is_file() for n in names), names
    assert len({d for d, _ in rows}) == len(rows)  # one run dir per row
    suffix = "" if model == "tiny" else f"_{model}"
    want = ["ar", f"sjd{suffix}", f"scd{suffix}", f"sjd_pac{suffix}", f"gsd{suffix}",
            *(["ar", "sjd2_tiny"] if model == "tiny" else [f"sjd2{suffix}"])]
    assert names == want


def test_default_rows_unchanged_and_subset_picks(tmp_path):
    default = decoders_of(plan("tiny", "shapes_coco", tmp_path, None, None, None, 0))
    assert default == ["ar", "sjd", "ar", "sjd2_tiny"]
    assert decoders_of(plan("tiny", "shapes_coco", tmp_path, None, None, None, 0, ["ar", "scd"])) == ["ar", "scd"]
    real = decoders_of(plan("lumina_mgpt", "geneval", tmp_path, None, None, None, 0, ["sjd", "sjd_pac", "sjd2"]))
    assert real == ["sjd_lumina_mgpt", "sjd_pac_lumina_mgpt"]  # no SJD2_PATH: its row is left out


def test_unknown_decoder_is_one_error_line(capsys):
    with pytest.raises(SystemExit):
        main(["--decoders", "ar,beam", "--set", "shapes_coco"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "unknown decoder(s) ['beam']" in err[0]


def test_family_preset_missing_for_janus_is_refused(tmp_path):
    from core.errors import UserError

    with pytest.raises(UserError, match="no scd preset for MODEL=janus_pro_1b"):
        plan("janus_pro_1b", "shapes_coco", tmp_path, None, None, None, 0, ["ar", "sjd", "scd"])
