"""The real loading paths over folders laid out as the published checkpoints (bench/published*.py at test
widths): every tensor lands where the file says, the tokenizer encodes as its tokenizer.json does, and a
broken download is refused with one line that names what is wrong."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bench.published import EMU3_8B, LUMINA_7B, tiny
from bench.published_emu3 import write_emu3
from bench.published_lumina import write_lumina, write_vqgan
from models import emu3, lumina_mgpt
from models.chameleon_vqgan import VQGANConfig

TINY_VQ = VQGANConfig(embed_dim=8, n_embed=8192, z_channels=8, ch=8, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1,
                      attn_type="none", norm_groups=4)
HF_TINY_VQ = VQGANConfig(embed_dim=8, n_embed=8192, z_channels=8, ch=32, ch_mult=(1,), num_res_blocks=1)  # config.json
EMU3_TINY_VQ = {"codebook_size": 32768, "embed_dim": 4, "latent_channels": 4, "base_channels": 32,
                "channel_multiplier": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "hidden_size": 32,
                "num_attention_heads": 1, "temporal_downsample_factor": 4}
PROMPT = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def lumina_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    write_lumina(root / "lumina", tiny(LUMINA_7B), vq=HF_TINY_VQ, seed=3, max_shard_bytes=2_000_000)
    write_vqgan(root / "vq", TINY_VQ)
    return root / "lumina", root / "vq"


@pytest.fixture(scope="module")
def emu3_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("published_emu3")
    return write_emu3(root / "emu3", tiny(EMU3_8B, heads=4), vq_config=EMU3_TINY_VQ, seed=4, max_shard_bytes=5_000_000)


def lumina_cfg(path, vq_path=None, image_size=64):
    return lumina_mgpt.LuminaMGPTConfig(name="lumina_pub", path=str(path), vq_path=vq_path and str(vq_path),
                                        image_size=image_size, device="cpu", dtype="bfloat16")


def emu3_cfg(path, image_size=32):
    return emu3.Emu3Config(name="emu3_pub", path=str(path), image_size=image_size, device="cpu", dtype="bfloat16")


def file_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_lumina_layout_is_sharded_with_an_index(lumina_dirs):
    ckpt, _ = lumina_dirs
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in ckpt.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and sorted(set(index["weight_map"].values())) == shards
    with safe_open(str(ckpt / index["weight_map"]["model.layers.0.self_attn.q_norm.weight"]), "pt") as f:
        assert tuple(f.get_tensor("model.layers.0.self_attn.q_norm.weight").shape) == (1, 16)  # Lumina's [1, head_dim]


def test_lumina_every_tensor_lands_where_the_file_says(lumina_dirs):
    ckpt, vq = lumina_dirs
    adapter = lumina_mgpt.load(lumina_cfg(ckpt, vq))
    model_state = adapter.model.state_dict()
    stored = file_tensors(ckpt)
    assert not [k for k in model_state if k not in stored and not k.startswith("model.vqmodel.")]
    for key, value in stored.items():
        got = model_state[key]
        if key.endswith(("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")):
            assert got.shape[0] == adapter.model.config.num_attention_heads
            value = value.expand_as(got)  # one stored row serves every head
        assert torch.equal(got, value), key
    assert adapter.model.dtype == torch.bfloat16
    pf = adapter.prompt(PROMPT)
    logits, _ = adapter.forward(adapter.embed(pf.input_ids), None, pf.attention_mask)
    assert torch.isfinite(logits).all()
    img = adapter.decode_image(adapter.layout.sequence(adapter.code_map.to_ids(torch.arange(16).view(4, 4))))
    assert img.size == (64, 64)


@pytest.mark.parametrize("which", ["lumina", "emu3"])
def test_prompt_ids_equal_the_tokenizer_json(which, lumina_dirs, emu3_dir):
    """transformers 5.x rebuilds a tokenizer declared LlamaTokenizer from its vocab (Metaspace); ours must
    encode the caption exactly as the file's own pipeline does."""
    from tokenizers import Tokenizer

    ckpt = lumina_dirs[0] if which == "lumina" else emu3_dir
    adapter = lumina_mgpt.load(lumina_cfg(ckpt)) if which == "lumina" else emu3.load(emu3_cfg(ckpt))
    raw = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    want = raw.encode(PROMPT, add_special_tokens=False).ids
    got = adapter.tokenizer.encode(PROMPT, add_special_tokens=False)
    assert got == want and len(want) < len(PROMPT)  # merges used: not one token per byte
    assert adapter.tokenizer.decode(got) == PROMPT


def test_emu3_every_tensor_lands_where_the_file_says(emu3_dir):
    adapter = emu3.load(emu3_cfg(emu3_dir))
    state = adapter.model.state_dict()
    stored = file_tensors(emu3_dir)
    renamed = {}
    for key, value in stored.items():  # the 4.48 names the hub files carry -> transformers 5.x names
        if key.startswith("text_model.lm_head."):
            renamed["lm_head." + key.removeprefix("text_model.lm_head.")] = value
        elif key.startswith("text_model.model."):
            renamed["model.text_model." + key.removeprefix("text_model.model.")] = value
        else:
            renamed["model." + key] = value
    assert set(renamed) == set(state)
    for key, value in renamed.items():
        assert torch.equal(state[key], value), key
    ids = adapter.layout.sequence(adapter.code_map.to_ids(torch.arange(16).view(4, 4)))
    assert adapter.decode_image(ids).size == (32, 32)


def test_missing_shard_is_named(lumina_dirs, tmp_path):
    ckpt = copy_ckpt(lumina_dirs[0], tmp_path / "ckpt")
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 weight shards .* missing \(model-00002-of-00003"):
        lumina_mgpt.load(lumina_cfg(ckpt))
    (ckpt / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors.index.json"):
        lumina_mgpt.load(lumina_cfg(ckpt))


def _rewrite_shard(ckpt, shard, edit):
    path = ckpt / shard
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard or k in state}
    index["weight_map"].update({k: shard for k in state})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_and_extra_keys_are_named(emu3_dir, tmp_path):
    ckpt = copy_ckpt(emu3_dir, tmp_path / "missing")
    _rewrite_shard(ckpt, "model-00002-of-00004.safetensors",
                   lambda s: s.pop(next(k for k in sorted(s) if "post_attention_layernorm" in k)))
    with pytest.raises(ValueError, match=r"keys missing 1 \(model\.text_model\.layers\.\d\.post_attention_layernorm"):
        emu3.load(emu3_cfg(ckpt))
    ckpt = copy_ckpt(emu3_dir, tmp_path / "extra")
    _rewrite_shard(ckpt, "model-00002-of-00004.safetensors", lambda s: s.update({"text_model.model.bogus": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"unexpected 1 \(.*bogus"):
        emu3.load(emu3_cfg(ckpt))


def test_other_models_folder_is_refused(lumina_dirs, emu3_dir):
    with pytest.raises(ValueError, match="'emu3' checkpoint.*needs model_type 'chameleon'"):
        lumina_mgpt.load(lumina_cfg(emu3_dir))
    with pytest.raises(ValueError, match="'chameleon' checkpoint.*needs model_type 'emu3'"):
        emu3.load(emu3_cfg(lumina_dirs[0]))


def test_vq_config_that_does_not_fit_the_checkpoint(lumina_dirs, tmp_path):
    import yaml

    vq = copy_ckpt(lumina_dirs[1], tmp_path / "vq")
    raw = yaml.safe_load((vq / "vqgan.yaml").read_text())
    raw["model"]["params"]["n_embed"] = 4096
    (vq / "vqgan.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"wrong shapes \['quantize.embedding.weight'\]"):
        lumina_mgpt.load(lumina_cfg(lumina_dirs[0], vq))
    write_vqgan(tmp_path / "vq4096", VQGANConfig(**{**TINY_VQ.__dict__, "n_embed": 4096}))
    with pytest.raises(ValueError, match="has 4096 codes but the vocabulary names 8192"):
        lumina_mgpt.load(lumina_cfg(lumina_dirs[0], tmp_path / "vq4096"))


def test_emu3_codebook_that_does_not_fit_the_vocabulary(emu3_dir, tmp_path):
    ckpt = copy_ckpt(emu3_dir, tmp_path / "ckpt")
    raw = json.loads((ckpt / "config.json").read_text())
    raw["vq_config"]["codebook_size"] = 16384
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="tensor shapes do not fit Emu3ForConditionalGeneration"):
        emu3.load(emu3_cfg(ckpt))


def test_image_size_beyond_the_position_table(lumina_dirs, emu3_dir):
    with pytest.raises(ValueError, match=r"needs \d+ positions but .*max_position_embeddings=4096"):
        lumina_mgpt.load(lumina_cfg(lumina_dirs[0], image_size=1024))  # 64 x 65 + 5 tokens
    with pytest.raises(ValueError, match="max_position_embeddings=9216"):
        emu3.load(emu3_cfg(emu3_dir, image_size=1024))


def test_embedding_stats_make_no_float32_copy_of_the_table(lumina_dirs):
    """The [V, D] embedding is 1-3 GB in float32 at real size: only the image-code rows may be cast."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CastShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.startswith("_to_copy") and isinstance(out, torch.Tensor) and out.ndim == 2:
                self.rows.append(out.shape[0])
            return out

    adapter = lumina_mgpt.load(lumina_cfg(lumina_dirs[0]))
    with CastShapes() as mode:
        mean, _ = adapter.embedding_stats()
    assert mode.rows and max(mode.rows) == adapter.code_map.n_codes < adapter.vocab_size
    table = adapter.backbone.get_input_embeddings().weight[adapter.layout.code_start : adapter.layout.code_stop]
    torch.testing.assert_close(mean, table.float().mean(0))
