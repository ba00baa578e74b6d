"""Janus-Pro adapter on tiny random JanusForConditionalGeneration configs: layout (576 codes, nothing forced),
prompt and padded CFG stream as ``generate(generation_mode="image")`` builds them, the generation embedding /
aligner / head, exact agreement with transformers' own image generation (greedy and sampled, token for
token), the VQ codec, loading and its refusals."""
from __future__ import annotations

import json

import pytest
import torch

from decode.ar import ar_decode
from decode.sampling import SamplingConfig
from models import load_adapter
from models.base import FREE
from models.janus import (
    N_CODES,
    TINY_IDS,
    TINY_TOKENIZER_SIZE,
    JanusProConfig,
    RandomSizes,
    build_random,
    load,
)
from tests.conftest import reinit
from tests.hf_helpers import ar_decode_counts, attention_implementations_agree, random_config

BOS, PAD, BOI = (TINY_IDS[n] + N_CODES for n in ("<｜begin▁of▁sentence｜>", "<｜▁pad▁｜>", "<begin_of_image>"))
GREEDY = SamplingConfig(cfg_scale=5.0, top_k=1)


def _cfg(**kw) -> JanusProConfig:
    return random_config(JanusProConfig, RandomSizes(), {"name": "janus_test", "image_size": 384, **kw})


@pytest.fixture(scope="module")
def janus384():
    """384 px (576 codes), weights redrawn so that predictions depend on the context."""
    return reinit(build_random(_cfg()))


@pytest.fixture(scope="module")
def janus64():
    return reinit(build_random(_cfg(image_size=64, seed=1)), seed=2)


def hf_generate(adapter, text: str, **kwargs) -> torch.Tensor:
    """transformers' own image generation of ``text`` (our prompt ids, in the tokenizer's ids) -> codes [n]."""
    ids = adapter.prompt(text, cfg=False).input_ids - N_CODES
    out = adapter.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                 guidance_scale=5.0, **kwargs)
    return out[0]


# ---------------------------------------------------------------------------------------------------
# Layout, prompt, embeddings


def test_layout_is_576_codes_with_nothing_forced(janus384):
    lay = janus384.layout
    assert (lay.height, lay.width, lay.head, lay.eol, lay.tail) == (24, 24, (), None, ())
    assert lay.n_tokens == 576 and (lay.code_start, lay.code_stop) == (0, N_CODES) == (0, janus384.vocab_size)
    assert bool((lay.forced_ids(torch.arange(576)) == FREE).all())


def test_prompt_template_and_padded_unconditional_stream(janus384):
    pf = janus384.prompt("  a red circle ")
    cond, uncond = pf.input_ids.tolist()
    assert pf.attention_mask.tolist() == [[1] * len(cond)] * 2  # the pads are attended, not masked
    assert cond[0] == BOS and cond[-1] == BOI
    assert janus384.tokenizer.decode([t - N_CODES for t in cond[1:-1]]) == "<|User|>: a red circle\n\n<|Assistant|>:"
    assert uncond == [BOS] + [PAD] * (len(cond) - 2) + [BOI]
    assert janus384.prompt("a red circle", cfg=False).input_ids.tolist() == [cond]
    assert janus384.prompt_ids("a red circle") == cond


def test_generate_feeds_the_same_prefill_embeddings(janus64):
    """The first forward of ``generate(generation_mode="image")`` sees exactly our two CFG rows."""
    seen = []
    hook = janus64.backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["inputs_embeds"]),
                                                      with_kwargs=True)
    try:
        hf_generate(janus64, "two blue squares", do_sample=False)
    finally:
        hook.remove()
    pf = janus64.prompt("two blue squares")
    torch.testing.assert_close(seen[0], janus64.embed(pf.input_ids), rtol=0, atol=0)
    assert all(s.shape[:2] == (2, 1) for s in seen[1:])  # then one code per step, both streams


def test_embeddings_and_logits_go_through_the_generation_modules(janus64):
    codes = torch.tensor([[0, 5, N_CODES - 1]])
    model = janus64.model
    torch.testing.assert_close(janus64.embed(codes), model.prepare_embeddings_for_image_generation(codes))
    text = torch.tensor([[17, 100000]])
    torch.testing.assert_close(janus64.embed(text + N_CODES), model.get_input_embeddings()(text))
    pf = janus64.prompt("x", cfg=False)
    ids = torch.cat([pf.input_ids, codes], 1)
    logits, _ = janus64.forward(janus64.embed(ids), None, torch.ones_like(ids))
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=janus64.embed(ids)).last_hidden_state
        ref = model.model.generation_head(hidden)
    assert logits.shape == (1, ids.shape[1], N_CODES) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref.float(), atol=1e-5, rtol=0)


def test_reserved_ids_are_text_rows_the_tokenizer_never_names(janus384):
    res = janus384.reserved_ids
    assert len(set(res)) == 128 and res[0] == N_CODES + TINY_TOKENIZER_SIZE
    vocab_ids = set(janus384.tokenizer.get_vocab().values())
    assert not {r - N_CODES for r in res} & vocab_ids
    assert not set(res) & set(janus384.prompt("a red circle").input_ids.flatten().tolist())


def test_embedding_stats_are_taken_in_the_aligners_output_space(janus64):
    with torch.no_grad():
        rows = janus64.model.prepare_embeddings_for_image_generation(torch.arange(N_CODES)).float()
    mean, std = janus64.embedding_stats()
    torch.testing.assert_close(mean, rows.mean(0))
    torch.testing.assert_close(std, rows.std(0))
    from dataclasses import replace

    janus64.cfg = replace(janus64.cfg, norm_stats="scalar")
    try:
        mean, std = janus64.embedding_stats()
    finally:
        janus64.cfg = replace(janus64.cfg, norm_stats="per_dim")
    assert mean.shape == rows[0].shape and len(set(mean.tolist())) == len(set(std.tolist())) == 1 and float(std[0]) == pytest.approx(float(rows.std()))
    with pytest.raises(ValueError, match="norm_stats must be one of"):
        _cfg(norm_stats="median")


# ---------------------------------------------------------------------------------------------------
# Exactness against transformers' generate(generation_mode="image")


def test_greedy_ar_equals_transformers_generate_over_576_codes(janus384):
    ours = ar_decode(janus384, janus384.prompt("a red circle"), GREEDY, torch.Generator().manual_seed(0))
    theirs = hf_generate(janus384, "a red circle", do_sample=False)
    assert ours.n_forwards == 576 and torch.equal(ours.tokens, theirs)
    assert len(set(ours.tokens.tolist())) > 10  # a context-dependent sequence, not one repeated code


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_ar_equals_transformers_generate_draw_for_draw(janus64, seed):
    """Same seed, same draws: our generator and torch.multinomial on the global RNG sample alike (CFG 5,
    temperature 1, no top-k: Janus's own defaults)."""
    sampled = SamplingConfig(cfg_scale=5.0, temperature=1.0, top_k=0)
    ours = ar_decode(janus64, janus64.prompt("a red circle"), sampled, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    theirs = hf_generate(janus64, "a red circle", do_sample=True, top_k=0)
    assert torch.equal(ours.tokens, theirs)
    greedy = ar_decode(janus64, janus64.prompt("a red circle"), GREEDY, torch.Generator().manual_seed(0))
    assert not torch.equal(ours.tokens, greedy.tokens)  # really sampled


def test_ar_decode_at_384_spends_576_forwards(janus384):
    n_forwards, result = ar_decode_counts(janus384)
    assert n_forwards == result.n_forwards == 576 and result.tokens.numel() == 576
    assert janus384.layout.violations(result.tokens) == []


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_window_rollback_equals_full_recompute(janus64, attn):
    attention_implementations_agree(janus64, attn)


# ---------------------------------------------------------------------------------------------------
# VQ codec


def test_decode_image_is_transformers_postprocess(janus64):
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    codes = torch.randint(0, N_CODES, (16,), generator=torch.Generator().manual_seed(3))
    image = janus64.decode_image(codes)
    assert image.size == (64, 64)
    with torch.no_grad():
        decoded = janus64.model.decode_image_tokens(codes[None])
    # the hub's preprocessor_config.json states mean = std = 0.5 (the class defaults are CLIP's); its numpy
    # backend assumes channels first: decode_image_tokens' [B, H, W, 3] goes in permuted
    ref = JanusImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3).postprocess(list(decoded.permute(0, 3, 1, 2).float()), return_tensors="PIL.Image.Image",
                                           input_data_format="channels_first")["pixel_values"][0]
    assert list(image.getdata()) == list(ref.getdata())
    with pytest.raises(ValueError, match="breaks the Janus layout"):
        janus64.decode_image(torch.full((16,), N_CODES + 5))
    with pytest.raises(ValueError, match="breaks the Janus layout"):
        janus64.decode_image(codes[:15])


def test_encode_image_gives_the_vq_codes(janus64):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    seq = janus64.encode_image(img)
    pixels = torch.from_numpy(np.asarray(img, np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        ref = janus64.model.model.vqmodel.encode(pixels).image_tokens
    assert seq.shape == (16,) and torch.equal(seq, ref.flatten()) and janus64.layout.violations(seq) == []
    assert janus64.decode_image(seq).size == (64, 64)
    with pytest.raises(ValueError, match="64x64"):
        janus64.encode_image(img.resize((48, 48)))


# ---------------------------------------------------------------------------------------------------
# Loading and its refusals


@pytest.fixture(scope="module")
def janus_checkpoint(tmp_path_factory, janus64):
    folder = tmp_path_factory.mktemp("janus_ckpt")
    janus64.model.save_pretrained(folder)
    janus64.tokenizer.save_pretrained(folder)
    return folder


def _real(**kw) -> dict:
    """conf/model/janus_pro_1b.yaml on CPU / float32 with overrides."""
    from omegaconf import OmegaConf

    from models import REPO_ROOT

    raw = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf/model/janus_pro_1b.yaml"))
    return {**raw, "device": "cpu", "dtype": "float32", **kw}


def test_checkpoint_folder_loads(janus_checkpoint, janus64):
    (janus_checkpoint / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4] * 3, "image_std": [0.3] * 3}))
    loaded = load_adapter(_real(path=str(janus_checkpoint), image_size=64))
    pf = janus64.prompt("a red circle")
    want, _ = janus64.forward(janus64.embed(pf.input_ids), None, pf.attention_mask)
    got, _ = loaded.forward(loaded.embed(pf.input_ids), None, pf.attention_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert loaded.ids == janus64.ids and loaded.reserved_ids == janus64.reserved_ids
    assert loaded.cfg.image_mean == (0.4, 0.4, 0.4) and loaded.sjd2_recipe is None


@pytest.mark.parametrize("size, codebook, message", [
    (384, N_CODES, r"generates 64px images \(4x4 codes, 16 image tokens\) but model.image_size=384; set model.image_size=64"),
    (64, 8192, r"has a 16384-code generation codebook but model.codebook_size=8192"),
])
def test_a_checkpoint_of_another_size_or_codebook_is_refused(janus_checkpoint, size, codebook, message):
    with pytest.raises(ValueError, match=message):
        load_adapter(_real(path=str(janus_checkpoint), image_size=size, codebook_size=codebook))


@pytest.mark.parametrize("kind", ["chameleon", "emu3"])
def test_a_lumina_or_emu3_folder_is_refused_with_one_line(tmp_path, kind, capsys):
    """model=janus_pro_1b pointed at a Lumina-mGPT (Chameleon) or Emu3 checkpoint: one line, exit 2."""
    from transformers import ChameleonConfig, Emu3Config

    (ChameleonConfig() if kind == "chameleon" else Emu3Config()).save_pretrained(tmp_path / kind)
    with pytest.raises(ValueError, match=rf"holds a '{kind}' checkpoint.*needs model_type 'janus'"):
        load_adapter(_real(path=str(tmp_path / kind)))
    from core.config import compose_config
    from decode.run import _run_and_report

    cfg = compose_config(["model=janus_pro_1b", f"model.path={tmp_path / kind}", "model.device=cpu",
                          f"out_dir={tmp_path / 'run'}", "prompts.limit=1", "progress=false"])
    with pytest.raises(SystemExit) as stop:
        _run_and_report(cfg)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.count("\n") == 0
    assert err.startswith(f"error: {tmp_path / kind} holds a '{kind}' checkpoint") and "Janus-Pro-1B" in err
    assert not (tmp_path / "run").exists()


def test_missing_folder_uncached_hub_id_and_missing_weights(tmp_path, janus_checkpoint):
    import shutil

    with pytest.raises(FileNotFoundError, match="does not exist.*huggingface-cli download deepseek-community/Janus-Pro-1B"):
        load(_cfg(path=str(tmp_path / "nowhere"), random_init=False, random_sizes=None))
    with pytest.raises(FileNotFoundError, match="Hugging Face cache.*model.path"):
        load(_cfg(path="nobody-here/not-a-janus", random_init=False, random_sizes=None))
    empty = tmp_path / "empty"
    shutil.copytree(janus_checkpoint, empty)
    for f in empty.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load(_cfg(path=str(empty), image_size=64, random_init=False, random_sizes=None))


def test_registry_and_yaml():
    from omegaconf import OmegaConf

    from core.config import compose_config
    from models import REPO_ROOT

    raw = OmegaConf.load(REPO_ROOT / "conf/model/janus_tiny_random.yaml")
    adapter = load_adapter(OmegaConf.merge(raw, {"image_size": 64}))
    assert adapter.layout.n_tokens == 16 and adapter.name == "janus_tiny_random"
    for name, hub in (("janus_pro_1b", "deepseek-community/Janus-Pro-1B"), ("janus_pro_7b", "deepseek-community/Janus-Pro-7B")):
        cfg = JanusProConfig(**OmegaConf.to_container(OmegaConf.load(REPO_ROOT / f"conf/model/{name}.yaml")))
        assert (cfg.path, cfg.image_size, cfg.codebook_size, cfg.random_init) == (hub, 384, N_CODES, False)
        assert compose_config([f"model={name}"]).sampling.cfg_scale == 5.0
    with pytest.raises(ValueError, match="unknown key.*imagesize"):
        load_adapter({**OmegaConf.to_container(raw), "imagesize": 3})
    with pytest.raises(ValueError, match="multiple of 16px"):
        _cfg(image_size=100)
