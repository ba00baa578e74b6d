"""Meta's Chameleon image tokenizer (VQGAN, codebook 8192, downsample 16): encoder and decoder.

transformers ships only the Chameleon VQ *encoder*; Lumina-mGPT decodes images with Meta's original
VQGAN (taming-transformers style), which users place on disk as ``vqgan.yaml`` + ``vqgan.ckpt``
(the ``tokenizer/`` folder of Meta's Chameleon release). This module is our own implementation whose
parameter names equal the keys of that checkpoint's ``state_dict``::

    encoder.conv_in | encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}
    encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out} | encoder.down.{i}.downsample.conv
    encoder.mid.{block_1,attn_1,block_2} | encoder.norm_out | encoder.conv_out
    decoder.conv_in | decoder.mid.* | decoder.up.{i}.block.{j}.* | decoder.up.{i}.attn.{j}.*
    decoder.up.{i}.upsample.conv | decoder.norm_out | decoder.conv_out
    quantize.embedding.weight | quant_conv | post_quant_conv

Keys of the training loss (``loss.*``: discriminator, LPIPS) are dropped on load; everything else
must match (strict). Pixels are in [-1, 1]; codes are VQ indices in [0, n_embed).
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

VQ_FILES = ("vqgan.yaml", "vqgan.ckpt")
VQ_HINT = (
    "put Meta's Chameleon image tokenizer there: the files tokenizer/vqgan.yaml and tokenizer/vqgan.ckpt of "
    "the Chameleon release (https://ai.meta.com/resources/models-and-libraries/chameleon-downloads/; "
    "Lumina-mGPT expects them in ckpts/chameleon/tokenizer/), then set model.vq_path=<that folder>"
)


@dataclass(frozen=True)
class VQGANConfig:
    """The ``model.params`` of Meta's ``vqgan.yaml`` (``ddconfig`` flattened). Defaults = Meta's file."""

    embed_dim: int = 256  # codebook vector size
    n_embed: int = 8192  # codebook entries
    z_channels: int = 256
    double_z: bool = False
    resolution: int = 512
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # downsample 2 ** (len - 1) = 16
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    attn_type: str = "vanilla"  # "vanilla" | "none" (middle-block attention)
    norm_groups: int = 32  # GroupNorm groups (Meta: 32); smaller only for tiny test models

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.attn_type not in ("vanilla", "none"):
            raise ValueError(f"VQGAN attn_type must be 'vanilla' or 'none', got {self.attn_type!r}")
        for c in {self.ch * m for m in self.ch_mult} | {self.ch}:
            if c % self.norm_groups:
                raise ValueError(f"VQGAN channels {c} are not divisible by norm_groups={self.norm_groups}")

    @property
    def downsample(self) -> int:
        """Pixels per code side."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_yaml_dict(cls, raw: Mapping[str, Any]) -> VQGANConfig:
        """Meta's ``vqgan.yaml`` as a dict (``{"model": {"params": ...}}``, or the params alone)."""
        params = dict(raw.get("model", {}).get("params", raw)) if "model" in raw else dict(raw)
        flat = {k: v for k, v in params.items() if k not in ("ddconfig", "lossconfig", "ckpt_path")}
        flat.update(params.get("ddconfig", {}))
        known = {f.name for f in fields(cls)}
        ignored = sorted(set(flat) - known)
        if ignored:
            log.debug("vqgan.yaml keys not used by the model: %s", ignored)
        return cls(**{k: v for k, v in flat.items() if k in known})


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus a 1x1 shortcut when the channel count changes."""

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 convolutions."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).flatten(2).transpose(1, 2)  # [B, HW, C]
        k = self.k(y).flatten(2).transpose(1, 2)
        v = self.v(y).flatten(2).transpose(1, 2)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # [B, HW, C]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding right/bottom by one pixel."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _attn(cfg: VQGANConfig, channels: int) -> nn.Module:
    return AttnBlock(channels, cfg.norm_groups) if cfg.attn_type == "vanilla" else nn.Identity()


def _mid(cfg: VQGANConfig, channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout)
    mid.attn_1 = _attn(cfg, channels)
    mid.block_2 = ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Pixels [B, 3, H, W] -> latents [B, z_channels, H/16, W/16]."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in, res = cfg.ch, cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(c_in, cfg.ch * mult, cfg.norm_groups, cfg.dropout))
                c_in = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    stage.attn.append(_attn(cfg, c_in))
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(c_in)
                res //= 2
            self.down.append(stage)
        self.mid = _mid(cfg, c_in)
        self.norm_out = _norm(c_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels * (2 if cfg.double_z else 1), 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for j, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents [B, z_channels, h, w] -> pixels [B, 3, 16h, 16w]."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        n_levels = len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n_levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _mid(cfg, c_in)
        stages: list[nn.Module] = []
        for level in reversed(range(n_levels)):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(c_in, cfg.ch * cfg.ch_mult[level], cfg.norm_groups, cfg.dropout))
                c_in = cfg.ch * cfg.ch_mult[level]
                if res in cfg.attn_resolutions:
                    stage.attn.append(_attn(cfg, c_in))
            if level != 0:
                stage.upsample = Upsample(c_in)
                res *= 2
            stages.insert(0, stage)  # self.up[i] is level i (finest first), as in the checkpoint
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(c_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            for j, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    """Nearest-codeword lookup over ``embedding.weight`` [n_embed, embed_dim]."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """[B, D, h, w] -> LongTensor [B, h, w]."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # [B*h*w, D]
        book = self.embedding.weight.float()  # [N, D]
        dist = flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * flat @ book.T  # [B*h*w, N]
        return dist.argmin(1).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """LongTensor [B, h, w] -> [B, D, h, w]."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


class ChameleonVQGAN(nn.Module):
    """Encoder + quantiser + decoder with the parameter names of Meta's ``vqgan.ckpt``."""

    def __init__(self, cfg: VQGANConfig = VQGANConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] (H, W multiples of 16) -> codes LongTensor [B, H/16, W/16]."""
        if pixels.shape[-1] % self.downsample or pixels.shape[-2] % self.downsample:
            raise ValueError(f"image sides {tuple(pixels.shape[-2:])} must be multiples of {self.downsample} px")
        p = next(self.parameters())
        return self.quantize.codes(self.quant_conv(self.encoder(pixels.to(p.device, p.dtype))))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes LongTensor [B, h, w] -> pixels [B, 3, 16h, 16w] (float32, unclamped, about [-1, 1])."""
        codes = torch.as_tensor(codes, dtype=torch.long, device=next(self.parameters()).device)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.n_embed):
            raise ValueError(f"VQGAN codes must lie in [0, {self.cfg.n_embed}), got [{int(codes.min())}, {int(codes.max())}]")
        z = self.quantize.lookup(codes)
        return self.decoder(self.post_quant_conv(z)).float()


# ---------------------------------------------------------------------------------------------------
# Pixels <-> PIL (Meta's ImageTokenizer conventions: RGB, alpha blended on white, [-1, 1])


def pil_to_pixels(image: Any) -> torch.Tensor:
    """PIL image -> float32 [1, 3, H, W] in [-1, 1]; transparency is blended onto white."""
    from PIL import Image

    if image.mode != "RGB":
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        image = Image.fromarray((rgba[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8), "RGB")
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def pixels_to_pil(pixels: torch.Tensor) -> Any:
    """float [3, H, W] (or [1, 3, H, W]) in [-1, 1] -> PIL RGB image."""
    from PIL import Image

    x = pixels.detach().float().cpu().reshape(-1, *pixels.shape[-2:])[:3]
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


# ---------------------------------------------------------------------------------------------------
# Loading Meta's files


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta's checkpoint ``state_dict`` -> our keys: drops the training-loss modules (``loss.*``)."""
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


def load_state_dict_strict(model: ChameleonVQGAN, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Load Meta-named weights; any missing or unexpected key is an error naming the keys."""
    state = convert_state_dict(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source} does not fit the VQGAN built from vqgan.yaml: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shapes {wrong[:5]}. Is it Meta's Chameleon tokenizer/vqgan.ckpt with its own vqgan.yaml?"
        )
    model.load_state_dict(state, strict=True)


def _read_ckpt(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as err:  # Lightning pickles callback objects
        log.warning("%s is not loadable with weights_only=True (%s); loading it as a full pickle", path, err)
        raw = torch.load(path, map_location="cpu", weights_only=False)
    return raw.get("state_dict", raw) if isinstance(raw, Mapping) else raw


def load_vqgan(vq_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ChameleonVQGAN:
    """Build the VQGAN from ``<vq_dir>/vqgan.yaml`` and load ``<vq_dir>/vqgan.ckpt`` (strict)."""
    import yaml

    vq_dir = Path(vq_dir).expanduser()
    for name in VQ_FILES:
        if not (vq_dir / name).is_file():
            raise FileNotFoundError(f"Chameleon VQGAN file {vq_dir / name} does not exist; {VQ_HINT}")
    cfg = VQGANConfig.from_yaml_dict(yaml.safe_load((vq_dir / "vqgan.yaml").read_text()))
    model = ChameleonVQGAN(cfg)
    load_state_dict_strict(model, _read_ckpt(vq_dir / "vqgan.ckpt"), source=str(vq_dir / "vqgan.ckpt"))
    return model.to(device=device, dtype=dtype).eval()
