"""Meta's Chameleon VQGAN: parameter names of vqgan.ckpt, strict loading, shapes, encoder == transformers'."""
from __future__ import annotations

import pytest
import torch
import yaml

from models.chameleon_vqgan import (
    ChameleonVQGAN,
    VQGANConfig,
    load_state_dict_strict,
    load_vqgan,
    pil_to_pixels,
    pixels_to_pil,
)

# A small config in the shape of Meta's vqgan.yaml (model.params with ddconfig and lossconfig).
SMALL_YAML = """
model:
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 4
    n_embed: 16
    ddconfig:
      double_z: false
      z_channels: 4
      resolution: 32
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 2]
      num_res_blocks: 1
      attn_resolutions: [16]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {disc_start: 0}
"""


def _meta_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The keys and shapes Meta's VQModel (taming Encoder/Decoder) has for SMALL_YAML, written out by hand."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def t(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    def conv(name, c_out, c_in, k):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = t(c_out, c_in, k, k), t(c_out)

    def norm(name, c):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + t(c), t(c)

    def resnet(name, c_in, c_out):
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_out, c_in, 3)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_out, c_in, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    conv("encoder.conv_in", 32, 3, 3)
    resnet("encoder.down.0.block.0", 32, 32)  # level 0 at 32 px: no attention
    conv("encoder.down.0.downsample.conv", 32, 32, 3)
    resnet("encoder.down.1.block.0", 32, 64)  # level 1 at 16 px: attention
    attn("encoder.down.1.attn.0", 64)
    resnet("encoder.mid.block_1", 64, 64)
    attn("encoder.mid.attn_1", 64)
    resnet("encoder.mid.block_2", 64, 64)
    norm("encoder.norm_out", 64)
    conv("encoder.conv_out", 4, 64, 3)
    conv("decoder.conv_in", 64, 4, 3)
    resnet("decoder.mid.block_1", 64, 64)
    attn("decoder.mid.attn_1", 64)
    resnet("decoder.mid.block_2", 64, 64)
    resnet("decoder.up.1.block.0", 64, 64)  # num_res_blocks + 1 blocks per level, at 16 px with attention
    attn("decoder.up.1.attn.0", 64)
    resnet("decoder.up.1.block.1", 64, 64)
    attn("decoder.up.1.attn.1", 64)
    conv("decoder.up.1.upsample.conv", 64, 64, 3)
    resnet("decoder.up.0.block.0", 64, 32)
    resnet("decoder.up.0.block.1", 32, 32)
    norm("decoder.norm_out", 32)
    conv("decoder.conv_out", 3, 32, 3)
    sd["quantize.embedding.weight"] = t(16, 4) * 10
    conv("quant_conv", 4, 4, 1)
    conv("post_quant_conv", 4, 4, 1)
    sd["loss.discriminator.main.0.weight"] = t(8, 3, 4, 4)  # training-loss weights: dropped on load
    return sd


@pytest.fixture(scope="module")
def small() -> ChameleonVQGAN:
    model = ChameleonVQGAN(VQGANConfig.from_yaml_dict(yaml.safe_load(SMALL_YAML)))
    load_state_dict_strict(model, _meta_state_dict())
    return model.eval()


def test_yaml_flattens_ddconfig_and_ignores_loss():
    cfg = VQGANConfig.from_yaml_dict(yaml.safe_load(SMALL_YAML))
    assert (cfg.n_embed, cfg.embed_dim, cfg.z_channels, cfg.ch, cfg.ch_mult) == (16, 4, 4, 32, (1, 2))
    assert cfg.attn_resolutions == (16,) and cfg.downsample == 2


def test_default_config_is_chameleon_shape():
    cfg = VQGANConfig()
    assert (cfg.n_embed, cfg.embed_dim, cfg.downsample) == (8192, 256, 16)


def test_meta_keys_load_strictly(small):
    meta = _meta_state_dict()
    own = small.state_dict()
    assert set(own) == set(meta) - {"loss.discriminator.main.0.weight"}
    for k, v in own.items():
        assert torch.equal(v, meta[k]), k


def test_missing_or_extra_key_is_an_error():
    model = ChameleonVQGAN(VQGANConfig.from_yaml_dict(yaml.safe_load(SMALL_YAML)))
    sd = _meta_state_dict()
    del sd["decoder.up.1.upsample.conv.weight"]
    with pytest.raises(ValueError, match="missing .*decoder.up.1.upsample.conv.weight"):
        load_state_dict_strict(model, sd)
    sd = _meta_state_dict()
    sd["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected .*encoder.extra.weight"):
        load_state_dict_strict(model, sd)


def test_shapes_round_trip(small):
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = small.encode(pixels)
    assert codes.shape == (2, 16, 16) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 16
    out = small.decode(codes)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multiples of 2"):
        small.encode(torch.zeros(1, 3, 33, 32))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        small.decode(torch.full((1, 2, 2), 16))


def test_encoder_matches_transformers_chameleon_vqvae(small):
    """transformers' ChameleonVQVAE (encoder only) uses the same names: same weights -> same codes."""
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    hf = ChameleonVQVAE(ChameleonVQVAEConfig(
        embed_dim=4, num_embeddings=16, latent_channels=4, resolution=32, base_channels=32,
        channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[16],
    )).eval()
    sd = {k: v for k, v in _meta_state_dict().items() if not k.startswith(("decoder.", "loss."))}
    hf.load_state_dict(sd, strict=True)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = hf.encode(pixels, return_dict=True)
    assert torch.allclose(small.encoder(pixels), ref.last_hidden_state, atol=1e-5)
    assert torch.equal(small.encode(pixels).flatten(), ref.image_tokens.flatten())


def test_load_vqgan_from_folder(tmp_path):
    (tmp_path / "vqgan.yaml").write_text(SMALL_YAML)
    torch.save({"state_dict": _meta_state_dict(), "global_step": 7}, tmp_path / "vqgan.ckpt")
    model = load_vqgan(tmp_path)
    assert torch.equal(model.quantize.embedding.weight, _meta_state_dict()["quantize.embedding.weight"])


def test_missing_files_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vqgan\.yaml.*tokenizer/vqgan\.ckpt.*model\.vq_path"):
        load_vqgan(tmp_path / "nowhere")


def test_pil_pixels_round_trip():
    from PIL import Image

    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent -> white
    px = pil_to_pixels(img)
    assert px.shape == (1, 3, 4, 4) and torch.allclose(px, torch.ones_like(px))
    back = pixels_to_pil(torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 2, 2))
    assert back.getpixel((0, 0)) == (0, 128, 255)
