"""``make decoders`` (bench/decoder_table.py, issue 19): the rows it plans; nothing is decoded here."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bench.decoder_table import DEFAULT_ROWS, ROWS, decode_overrides, resolve_rows, row_seeds

CONF = Path(__file__).resolve().parents[1] / "conf"


def decoder_options(name: str) -> set[str]:
    """Every option a decoder config (following its preset chain) defines."""
    conf = OmegaConf.load(CONF / "decoder" / f"{name}.yaml")
    parents = [d for d in conf.get("defaults", []) if isinstance(d, str) and (CONF / "decoder" / f"{d}.yaml").is_file()]
    return set(conf) - {"defaults"} | {o for p in parents for o in decoder_options(p)}


@pytest.mark.parametrize("label", sorted(ROWS))
def test_every_row_names_a_decoder_and_its_options(label):
    row = ROWS[label]
    assert (CONF / "model" / f"{row.model}.yaml").is_file()
    options = decoder_options(row.decoder)
    for o in row.overrides:
        key = o.split("=", 1)[0]
        assert key.startswith("decoder.") and key.removeprefix("decoder.") in options, (label, o)
    baseline = ROWS[row.baseline]
    assert baseline.decoder == "ar" and baseline.model == row.model  # compared with its own model's AR


def test_rows_resolve_with_their_baselines_first():
    rows = [r.label for r in resolve_rows(["sjd2_maximal", "scd_gumbel"])]
    assert rows.index("ar_sjd2") < rows.index("sjd2_maximal") and rows.index("ar") < rows.index("scd_gumbel")
    assert len(rows) == len(set(rows)) == 4
    every = {r.label for r in resolve_rows(None)}
    assert set(DEFAULT_ROWS) <= every and {"sjd_pac", "scd_maximal", "gsd", "sjd2_gumbel"} <= every
    with pytest.raises(SystemExit, match=r"^error: unknown row\(s\) \['beam'\]"):
        resolve_rows(["beam"])


def test_rest_rows_get_fewer_seeds_but_baselines_all(tmp_path):
    full = ["sjd"]
    assert row_seeds(ROWS["sjd"], [0, 1, 2], full, [0]) == [0, 1, 2]
    assert row_seeds(ROWS["ar_sjd2"], [0, 1, 2], full, [0]) == [0, 1, 2]  # a baseline pairs with every row
    assert row_seeds(ROWS["gsd"], [0, 1, 2], full, [0]) == [0]
    assert row_seeds(ROWS["gsd"], [0, 1, 2], None, [0]) == [0, 1, 2]
    args = decode_overrides(ROWS["sjd2_lossless_gumbel"], 2, tmp_path, 5)
    assert {"model=tiny_sjd2", "decoder=sjd2_tiny", "seed=2", "prompts.limit=5", "decoder.coupling=gumbel",
            "decoder.accept_only_clean_inputs=true"} <= set(args)
