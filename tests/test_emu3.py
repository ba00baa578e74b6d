"""Emu3 adapter on tiny random Emu3ForConditionalGeneration configs: layout, prompt/CFG with negative
prompt and left padding, code map by name, cache rollback, loading errors, AR decode."""
from __future__ import annotations

import json
import re

import pytest
import torch

from models import load_adapter
from models.base import FREE
from models.emu3 import (
    NEGATIVE_PROMPT,
    POSITIVE_SUFFIX,
    Emu3Config,
    RandomSizes,
    build_random,
    load,
    parse_visual_name,
    visual_name,
)
from tests.hf_helpers import ar_decode_counts, attention_implementations_agree, random_config

SIZES = RandomSizes()


def _cfg(**kw) -> Emu3Config:
    return random_config(Emu3Config, SIZES, {"name": "emu3_test", "image_size": 720, **kw})


@pytest.fixture(scope="module")
def emu720():
    return build_random(_cfg())


@pytest.fixture(scope="module")
def emu64_shuffled():
    order = torch.randperm(32768, generator=torch.Generator().manual_seed(4))
    # a short negative prompt keeps the full-recompute logits small ([2, T, 184622] float32)
    return build_random(_cfg(image_size=64, negative_prompt="lowres, blurry."), code_order=order), order


# ---------------------------------------------------------------------------------------------------
# Layout and prompt


def test_layout_counts_at_720(emu720):
    lay = emu720.layout
    assert lay.n_tokens == 8193
    assert (lay.height, lay.width, lay.head) == (90, 90, ())
    assert (lay.eol, lay.tail) == (151846, (151847, 151853, 151850))
    assert (lay.code_start, lay.code_stop) == (151854, 184622)
    forced = lay.forced_ids(torch.arange(lay.n_tokens))
    assert (forced == 151846).nonzero().flatten().tolist() == [90 + 91 * r for r in range(90)]
    assert forced[-3:].tolist() == [151847, 151853, 151850]
    assert int((forced == FREE).sum()) == 90 * 90


def test_other_sizes_and_bad_sizes():
    from models.emu3 import emu3_layout

    vocab = {"<|extra_200|>": 1, "<|extra_201|>": 2, "<|image end|>": 3, "<|extra_204|>": 4}
    assert emu3_layout(vocab, 64, 8, (10, 20)).n_tokens == 8 * 9 + 3
    with pytest.raises(ValueError, match="multiple of 8px"):
        emu3_layout(vocab, 100, 8, (10, 20))


def test_prompt_template_negative_prompt_and_left_padding(emu720):
    pf = emu720.prompt("a red circle")
    tok = emu720.tokenizer
    n_pos, n_neg = (int(x) for x in pf.attention_mask.sum(1))
    assert n_neg > n_pos  # the negative prompt is longer: row 0 is left-padded
    width = pf.input_ids.shape[1]
    for row, n, text in ((0, n_pos, "a red circle" + POSITIVE_SUFFIX), (1, n_neg, NEGATIVE_PROMPT)):
        ids = pf.input_ids[row]
        assert pf.attention_mask[row].tolist() == [0] * (width - n) + [1] * n
        assert set(ids[: width - n].tolist()) <= {151643}  # <|endoftext|> padding
        real = ids[width - n :].tolist()
        assert real[0] == 151849  # BOS
        assert tok.decode(real[1:-7]) == text
        assert real[-7] == 151852 and tok.decode(real[-6:-1]) == "90*90" and real[-1] == 151851
    no_cfg = emu720.prompt("a red circle", cfg=False)
    assert no_cfg.input_ids.shape == (1, n_pos) and no_cfg.attention_mask.all()
    assert emu720.prompt_ids("x")[1:-7] == tok.encode("x", add_special_tokens=False)  # no suffix for training


def test_reserved_ids_are_named_and_unused(emu720):
    res = emu720.reserved_ids
    assert len(set(res)) == 128 and res == tuple(range(151646, 151646 + 128))
    names = emu720.tokenizer.convert_ids_to_tokens(list(res))
    assert all(re.fullmatch(r"<\|extra_(\d+)\|>", n) and int(n[8:-2]) < 200 for n in names)
    lay = emu720.layout
    used = {lay.eol, *lay.tail, *emu720.prompt("x").input_ids.flatten().tolist()}
    assert not used & set(res)


# ---------------------------------------------------------------------------------------------------
# Code map by name, VQ-VAE codec


def test_visual_names_round_trip():
    assert visual_name(5) == "<|visual token 000005|>" and parse_visual_name(visual_name(32767)) == 32767
    assert parse_visual_name("<|extra_200|>") is None


def test_code_map_is_by_name(emu64_shuffled):
    adapter, order = emu64_shuffled
    ids = torch.arange(151854, 184622)
    by_name = torch.tensor([parse_visual_name(n) for n in adapter.tokenizer.convert_ids_to_tokens(ids.tolist())])
    assert torch.equal(adapter.code_map.to_codes(ids), by_name) and torch.equal(by_name, order)
    assert (by_name != ids - 151854).float().mean() > 0.99


def test_decode_image_uses_named_codes(emu64_shuffled):
    adapter, order = emu64_shuffled
    lay = adapter.layout
    grid = torch.randint(lay.code_start, lay.code_stop, (lay.height, lay.width), generator=torch.Generator().manual_seed(2))
    image = adapter.decode_image(lay.sequence(grid))
    assert image.size == (64, 64)
    codes = order[grid - 151854]  # what the names spell
    pixels = adapter.model.model.vqmodel.decode(codes[None])[0]  # [3, H, W] in [-1, 1]
    expect = ((pixels * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    assert torch.equal(torch.tensor(list(image.getdata()), dtype=torch.uint8).view(64, 64, 3), expect)
    with pytest.raises(ValueError, match="not image codes"):
        adapter.decode_image(lay.sequence(torch.full((8, 8), 151846)))


def test_encode_image_round_trips_shapes(emu64_shuffled):
    adapter, _ = emu64_shuffled
    from PIL import Image

    img = Image.new("RGB", (64, 64), (200, 30, 30))
    seq = adapter.encode_image(img)
    assert seq.shape == (75,) and adapter.layout.violations(seq) == []
    assert adapter.decode_image(seq).size == (64, 64)
    with pytest.raises(ValueError, match="64x64"):
        adapter.encode_image(img.resize((48, 48)))


# ---------------------------------------------------------------------------------------------------
# Cache


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_window_rollback_equals_full_recompute(emu64_shuffled, attn):
    attention_implementations_agree(emu64_shuffled[0], attn)


def test_adapter_uses_backbone_and_head(emu64_shuffled):
    adapter, _ = emu64_shuffled
    assert adapter.backbone is adapter.model.model.text_model
    assert adapter.backbone.get_input_embeddings() is adapter.model.get_input_embeddings()
    pf = adapter.prompt("x", cfg=False)
    logits, _ = adapter.forward(adapter.embed(pf.input_ids), None, pf.attention_mask)
    with torch.no_grad():
        ref = adapter.model(input_ids=pf.input_ids, attention_mask=pf.attention_mask).logits
    torch.testing.assert_close(logits, ref.float(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Loading


@pytest.fixture(scope="module")
def emu_checkpoint(tmp_path_factory, emu64_shuffled):
    adapter, _ = emu64_shuffled
    folder = tmp_path_factory.mktemp("emu3_ckpt")
    adapter.model.save_pretrained(folder)
    adapter.tokenizer.save_pretrained(folder)
    return folder


def test_checkpoint_folder_loads(emu_checkpoint, emu64_shuffled):
    ref, _ = emu64_shuffled
    (emu_checkpoint / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4] * 3, "image_std": [0.3] * 3}))
    loaded = load(_cfg(path=str(emu_checkpoint), image_size=64, random_init=False, random_sizes=None))
    pf = ref.prompt("a red circle")
    want, _ = ref.forward(ref.embed(pf.input_ids), None, pf.attention_mask)
    got, _ = loaded.forward(loaded.embed(pf.input_ids), None, pf.attention_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert loaded.cfg.image_mean == (0.4, 0.4, 0.4) and loaded.cfg.image_std == (0.3, 0.3, 0.3)


def test_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*huggingface-cli download BAAI/Emu3-Gen-hf"):
        load(_cfg(path=str(tmp_path / "nowhere"), random_init=False, random_sizes=None))


def test_wrong_model_type_and_missing_weights(tmp_path, emu_checkpoint):
    import shutil

    wrong = tmp_path / "wrong"
    shutil.copytree(emu_checkpoint, wrong)
    raw = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**raw, "model_type": "chameleon"}))
    with pytest.raises(ValueError, match="'chameleon' checkpoint.*needs model_type 'emu3'"):
        load(_cfg(path=str(wrong), random_init=False, random_sizes=None))
    empty = tmp_path / "empty"
    shutil.copytree(emu_checkpoint, empty)
    for f in empty.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load(_cfg(path=str(empty), random_init=False, random_sizes=None))


# ---------------------------------------------------------------------------------------------------
# Configs and AR decode


def test_registry_and_yaml():
    from omegaconf import OmegaConf

    from models import REPO_ROOT

    raw = OmegaConf.load(REPO_ROOT / "conf/model/emu3_tiny_random.yaml")
    adapter = load_adapter(OmegaConf.merge(raw, {"image_size": 64}))
    assert adapter.layout.n_tokens == 75 and adapter.name == "emu3_tiny_random"
    real = Emu3Config(**OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf/model/emu3_720.yaml")))
    assert (real.image_size, real.positive_suffix, real.negative_prompt) == (720, POSITIVE_SUFFIX, NEGATIVE_PROMPT)
    assert real.sampling_defaults == {"cfg_scale": 3.0, "temperature": 1.0, "top_k": 2000, "top_p": 1.0}


def test_ar_decode_small_respects_layout(emu64_shuffled):
    adapter, _ = emu64_shuffled
    n_forwards, result = ar_decode_counts(adapter)
    assert n_forwards == result.n_forwards == 75
    assert adapter.layout.violations(result.tokens) == []
    assert adapter.decode_image(result.tokens).size == (64, 64)


@pytest.mark.slow
def test_ar_decode_720_spends_8193_forwards(emu720):
    n_forwards, result = ar_decode_counts(emu720)
    assert n_forwards == 8193 and result.tokens.numel() == 8193
    assert emu720.layout.violations(result.tokens) == []
