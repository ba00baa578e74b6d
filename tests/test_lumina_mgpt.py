"""Lumina-mGPT adapter on tiny random Chameleon configs: layout, prompt/CFG, code map by name, cache
rollback, q/k-norm conversion, loading errors, AR decode."""
from __future__ import annotations

import json
import re
import time

import pytest
import torch

from models import load_adapter
from models.base import FREE
from models.chameleon_vqgan import pil_to_pixels, pixels_to_pil
from models.lumina_mgpt import (
    LuminaMGPTConfig,
    RandomSizes,
    build_random,
    code_name,
    expand_qk_norm,
    load,
    parse_code_name,
)
from tests.hf_helpers import ar_decode_counts, attention_implementations_agree, random_config

SIZES = RandomSizes()


def _cfg(**kw) -> LuminaMGPTConfig:
    return random_config(LuminaMGPTConfig, SIZES, {"name": "lumina_test", "image_size": 768, **kw})


@pytest.fixture(scope="module")
def lumina768():
    return build_random(_cfg())


@pytest.fixture(scope="module")
def lumina64_shuffled():
    """Image-code names shuffled over ids 4..8195: the id of code c is no longer 4 + c."""
    order = torch.randperm(8192, generator=torch.Generator().manual_seed(3))
    return build_random(_cfg(image_size=64), code_order=order), order


# ---------------------------------------------------------------------------------------------------
# Layout and prompt


def test_layout_counts_at_768(lumina768):
    lay = lumina768.layout
    assert lay.n_tokens == 2357
    assert (lay.height, lay.width) == (48, 48)
    assert lay.head == (8197, 8804 + 768 // 32, 8804 + 768 // 32)
    assert (lay.eol, lay.tail) == (8803, (8196, 8710))
    assert (lay.code_start, lay.code_stop) == (4, 8196)


def test_forced_positions_at_768(lumina768):
    lay = lumina768.layout
    forced = lay.forced_ids(torch.arange(lay.n_tokens))
    assert forced[:3].tolist() == [8197, 8828, 8828]
    eol_positions = (forced == 8803).nonzero().flatten()
    assert eol_positions.tolist() == [3 + 48 + 49 * r for r in range(48)]
    assert forced[-2:].tolist() == [8196, 8710]
    assert int((forced == FREE).sum()) == 48 * 48


@pytest.mark.parametrize("size, n_tokens, res", [(512, 3 + 32 * 33 + 2, 8820), (64, 3 + 4 * 5 + 2, 8806)])
def test_other_sizes_follow_the_same_rule(lumina768, size, n_tokens, res):
    from models.lumina_mgpt import lumina_layout

    lay = lumina_layout(lumina768.tokenizer.get_vocab(), size, (4, 8196))
    assert lay.n_tokens == n_tokens and lay.head[1] == res


@pytest.mark.parametrize("size", [100, 16, 0])
def test_bad_image_size_is_a_clear_error(size):
    with pytest.raises(ValueError, match="multiple of 32px"):
        build_random(_cfg(image_size=size))


def test_prompt_template_and_cfg_stream(lumina768):
    pf = lumina768.prompt("a red circle")
    ids = pf.input_ids
    assert ids.shape[0] == 2 and torch.equal(ids[0], ids[1])
    assert ids[0, 0] == 0 and ids[0, -1] == 8710  # <s> ... <reserved08706>
    text = lumina768.tokenizer.decode(ids[0, 1:-1].tolist())
    assert text == "Generate an image of 768x768 according to the following prompt:\na red circle"
    assert pf.attention_mask[0].tolist() == [1] * ids.shape[1]
    assert pf.attention_mask[1].tolist() == [0] * (ids.shape[1] - 1) + [1]
    single = lumina768.prompt("a red circle", cfg=False)
    assert single.input_ids.shape[0] == 1 and torch.equal(single.input_ids[0], ids[0])


def test_reserved_ids_are_named_and_unused(lumina768):
    res = lumina768.reserved_ids
    assert len(res) == 128 and len(set(res)) == 128
    names = lumina768.tokenizer.convert_ids_to_tokens(list(res))
    assert all(re.fullmatch(r"<reserved0(8[3-4]\d\d)>", n) for n in names)
    lay = lumina768.layout
    used = set(lay.head) | {lay.eol} | set(lay.tail) | set(lumina768.prompt("x").input_ids[0].tolist())
    assert not used & set(res)
    assert all(not (lay.code_start <= r < lay.code_stop) for r in res)


# ---------------------------------------------------------------------------------------------------
# Code map by name


def test_code_names_round_trip():
    assert code_name(0) == "IMGIMGAZ" and code_name(8191) == "IMGIMGIBJBZ"
    assert all(parse_code_name(code_name(c)) == c for c in (0, 7, 10, 4095, 8191))
    assert parse_code_name("<reserved08799>") is None and parse_code_name("IMGIMGZ") is None


def test_code_map_is_by_name(lumina64_shuffled):
    adapter, order = lumina64_shuffled
    ids = torch.arange(4, 8196)
    names = adapter.tokenizer.convert_ids_to_tokens(ids.tolist())
    by_name = torch.tensor([parse_code_name(n) for n in names])
    assert torch.equal(adapter.code_map.to_codes(ids), by_name)
    assert torch.equal(by_name, order)  # the shuffle made the names disagree with the offset
    assert (adapter.code_map.to_codes(ids) != ids - 4).float().mean() > 0.99
    with pytest.raises(ValueError, match="not image codes"):
        adapter.code_map.to_codes(torch.tensor([8803]))


def test_decode_and_encode_map_codes_by_name(lumina64_shuffled):
    adapter, order = lumina64_shuffled
    lay = adapter.layout
    grid_ids = torch.randint(lay.code_start, lay.code_stop, (lay.height, lay.width), generator=torch.Generator().manual_seed(1))
    image = adapter.decode_image(lay.sequence(grid_ids))
    assert image.size == (64, 64)
    codes = order[grid_ids - 4]  # id 4 + i spells code order[i]
    expected = adapter.vq.decode(codes[None])[0]
    assert list(image.getdata()) == list(pixels_to_pil(expected).getdata())
    seq = adapter.encode_image(image)
    assert lay.violations(seq) == []
    enc_codes = adapter.vq.encode(pil_to_pixels(image))[0]
    assert torch.equal(adapter.code_map.to_codes(lay.code_grid(seq)), enc_codes)
    with pytest.raises(ValueError, match="64x64"):
        adapter.encode_image(image.resize((32, 32)))


# ---------------------------------------------------------------------------------------------------
# Cache: windowed forward + rollback == full recompute, CFG streams, no NaN


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_window_rollback_equals_full_recompute(lumina64_shuffled, attn):
    attention_implementations_agree(lumina64_shuffled[0], attn)


def test_image_logits_are_not_masked(lumina768):
    """The adapter bypasses ChameleonForConditionalGeneration.forward, which floors every image logit."""
    pf = lumina768.prompt("x", cfg=False)
    logits, _ = lumina768.forward(lumina768.embed(pf.input_ids), None, pf.attention_mask)
    assert logits.dtype == torch.float32
    assert logits[0, -1, 4:8196].std() > 0 and logits[0, -1, 4:8196].min() > -1e4


# ---------------------------------------------------------------------------------------------------
# Real-checkpoint loading (a fake Lumina-style folder written here)


def _write_lumina_checkpoint(folder, adapter, model_type="chameleon"):
    """config.json as Lumina's hub repo has it, q/k-norm stored [1, head_dim], tokenizer files."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    adapter.model.config.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(model_type=model_type, architectures=["ChameleonXLLMXForConditionalGeneration"], z_loss_weight=1e-5)
    (folder / "config.json").write_text(json.dumps(raw))
    state = {}
    for k, v in adapter.model.state_dict().items():
        if k.startswith("model.vqmodel."):
            continue  # Lumina checkpoints carry no VQ weights
        if re.search(r"self_attn\.(q|k)_norm\.(weight|bias)$", k):
            v = v[:1]  # one row for every head, as Lumina stores it
        state[k] = v.contiguous()
    save_file(state, str(folder / "model.safetensors"))
    adapter.tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def lumina_shared_norm():
    """A tiny Lumina whose q/k-norm rows are the same for every head (what a [1, head_dim] row means)."""
    adapter = build_random(_cfg(image_size=64, seed=5))
    with torch.no_grad():
        for name, p in adapter.model.named_parameters():
            if re.search(r"self_attn\.(q|k)_norm\.(weight|bias)$", name):
                p.copy_((torch.randn(1, p.shape[1]) * 0.3 + (1.0 if name.endswith("weight") else 0.0)).expand_as(p))
    return adapter


def test_expand_qk_norm_shapes():
    state = {"model.layers.0.self_attn.q_norm.weight": torch.arange(4.0)[None], "other": torch.zeros(2, 4),
             "model.layers.0.self_attn.k_norm.bias": torch.arange(8.0).view(2, 4)}
    out = expand_qk_norm(state, num_heads=6, num_kv_heads=4)
    assert out["model.layers.0.self_attn.q_norm.weight"].shape == (6, 4)
    assert torch.equal(out["model.layers.0.self_attn.q_norm.weight"][5], torch.arange(4.0))
    assert torch.equal(out["model.layers.0.self_attn.k_norm.bias"][:, 0], torch.tensor([0.0, 0.0, 4.0, 4.0]))
    assert out["other"] is state["other"]
    with pytest.raises(ValueError, match="cannot expand"):
        expand_qk_norm({"l.self_attn.q_norm.weight": torch.zeros(4, 4)}, num_heads=6, num_kv_heads=6)


def test_lumina_checkpoint_with_single_row_qk_norm_loads(tmp_path, lumina_shared_norm):
    ref = lumina_shared_norm
    _write_lumina_checkpoint(tmp_path / "ckpt", ref)
    loaded = load(_cfg(path=str(tmp_path / "ckpt"), image_size=64, random_init=False, random_sizes=None))
    pf = ref.prompt("a red circle")
    want, _ = ref.forward(ref.embed(pf.input_ids), None, pf.attention_mask)
    got, _ = loaded.forward(loaded.embed(pf.input_ids), None, pf.attention_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert loaded.vq is None
    with pytest.raises(RuntimeError, match="vq_path"):
        loaded.decode_image(loaded.layout.sequence(torch.full((4, 4), 4)))


def test_fine_tuned_export_loads_with_its_sjd2_extras(tmp_path, lumina_shared_norm):
    """What train.export.export_weights writes for HF models: save_pretrained (expanded norms) + sjd2.json
    + timestep_mlp.safetensors."""
    from safetensors.torch import save_file

    from models.noisy import TimestepMLP

    ref = lumina_shared_norm
    out = tmp_path / "sjd2_ckpt"
    ref.model.save_pretrained(out)
    ref.tokenizer.save_pretrained(out)
    recipe = {"noise": {"timestep_signal": "mlp", "schedule": "rectified_flow"}, "name": "t"}
    (out / "sjd2.json").write_text(json.dumps(recipe))
    mlp = TimestepMLP(SIZES.hidden_size, width=16)
    torch.nn.init.normal_(mlp.net[2].weight)
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(out / "timestep_mlp.safetensors"))
    loaded = load(_cfg(path=str(out), image_size=64, random_init=False, random_sizes=None))
    assert loaded.sjd2_recipe == recipe
    t = torch.tensor([0.1, 0.7])
    torch.testing.assert_close(loaded.timestep_mlp(t), mlp(t))
    pf = ref.prompt("x")
    torch.testing.assert_close(loaded.forward(loaded.embed(pf.input_ids), None, pf.attention_mask)[0],
                               ref.forward(ref.embed(pf.input_ids), None, pf.attention_mask)[0], atol=1e-5, rtol=0)
    assert build_random(_cfg(image_size=64)).sjd2_recipe is None


def test_stock_loader_refuses_lumina_norm_shapes(tmp_path, lumina_shared_norm):
    """Why the conversion exists: transformers' own loader, without the converter our loader registers,
    refuses [1, head_dim] q/k-norm weights."""
    from transformers import ChameleonForConditionalGeneration
    from transformers import conversion_mapping as cm

    _write_lumina_checkpoint(tmp_path / "ckpt", lumina_shared_norm)
    cm.get_checkpoint_conversion_mapping("chameleon")  # builds the registry
    saved = cm._checkpoint_conversion_mapping_cache.pop(ChameleonForConditionalGeneration.__name__, None)
    try:
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            ChameleonForConditionalGeneration.from_pretrained(str(tmp_path / "ckpt"))
    finally:
        if saved is not None:
            cm._checkpoint_conversion_mapping_cache[ChameleonForConditionalGeneration.__name__] = saved


def test_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*huggingface-cli download Alpha-VLLM/Lumina-mGPT-7B-768"):
        load(_cfg(path=str(tmp_path / "nowhere"), random_init=False, random_sizes=None))


def test_uncached_hub_id_is_not_downloaded():
    with pytest.raises(FileNotFoundError, match="Hugging Face cache.*model.path"):
        load(_cfg(path="nobody-here/not-a-model", random_init=False, random_sizes=None))


def test_folder_without_weights_or_config(tmp_path, lumina_shared_norm):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        load(_cfg(path=str(tmp_path / "empty"), random_init=False, random_sizes=None))
    _write_lumina_checkpoint(tmp_path / "noweights", lumina_shared_norm)
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load(_cfg(path=str(tmp_path / "noweights"), random_init=False, random_sizes=None))


def test_wrong_model_type_is_refused(tmp_path, lumina_shared_norm):
    _write_lumina_checkpoint(tmp_path / "llama", lumina_shared_norm, model_type="llama")
    with pytest.raises(ValueError, match="'llama' checkpoint.*needs model_type 'chameleon'"):
        load(_cfg(path=str(tmp_path / "llama"), random_init=False, random_sizes=None))


def test_missing_vqgan_names_the_files(tmp_path, lumina_shared_norm):
    _write_lumina_checkpoint(tmp_path / "ckpt", lumina_shared_norm)
    with pytest.raises(FileNotFoundError, match="vqgan.yaml.*Chameleon"):
        load(_cfg(path=str(tmp_path / "ckpt"), image_size=64, random_init=False, random_sizes=None,
                  vq_path=str(tmp_path / "no_vq")))


# ---------------------------------------------------------------------------------------------------
# Configs and AR decode


def test_registry_and_yaml(lumina768):
    from omegaconf import OmegaConf

    from models import REPO_ROOT

    raw = OmegaConf.load(REPO_ROOT / "conf/model/lumina_mgpt_tiny_random.yaml")
    adapter = load_adapter(OmegaConf.merge(raw, {"image_size": 64}))
    assert adapter.layout.n_tokens == 25 and adapter.name == "lumina_mgpt_tiny_random"
    real = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf/model/lumina_mgpt_768.yaml"))
    cfg = LuminaMGPTConfig(**real)
    assert (cfg.image_size, cfg.random_init, cfg.sampling_defaults["top_k"], cfg.sampling_defaults["cfg_scale"]) == (
        768, False, 2000, 3.0)
    with pytest.raises(ValueError, match="unknown key.*imagesize"):
        load_adapter({**OmegaConf.to_container(raw), "imagesize": 3})


def test_ar_decode_small_respects_layout(lumina64_shuffled):
    adapter, _ = lumina64_shuffled
    n_forwards, result = ar_decode_counts(adapter)
    assert n_forwards == result.n_forwards == adapter.layout.n_tokens == 25
    assert adapter.layout.violations(result.tokens) == []
    assert adapter.decode_image(result.tokens).size == (64, 64)


def test_ar_decode_768_spends_2357_forwards(lumina768):
    start = time.perf_counter()
    n_forwards, result = ar_decode_counts(lumina768)
    assert n_forwards == 2357 and result.tokens.numel() == 2357
    assert lumina768.layout.violations(result.tokens) == []
    assert lumina768.decode_image(result.tokens).size == (768, 768)
    print(f"tiny Lumina AR decode at 768px: {time.perf_counter() - start:.1f}s")
