"""eval/fid.py end to end on hand-built COCO-format run dirs (shapes features, a stand-in Inception), and
the shapes feature network's evidence: renders of the right captions score far below noise images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import shapes
from eval import fid
from eval.run import load_run

CONFIG = "prompts:\n  name: shapes_coco\n  kind: coco_longest\nmodel:\n  name: tiny\n"


def caption_renders(n: int, scene_seed: int, caption_seed: int = 7) -> np.ndarray:
    """uint8 [n, 64, 64, 3]: a fresh scene for each of n balanced captions (captions fixed by caption_seed)."""
    rows = shapes.make_eval_prompts(-(-n // len(shapes.CATEGORIES)), caption_seed, limit=n)
    out = np.empty((n, 64, 64, 3), np.uint8)
    for i, row in enumerate(rows):
        rng = np.random.default_rng([scene_seed, i])
        out[i] = shapes.render(shapes.scene_for(rng, shapes.parse_caption(row["prompt"])))
    return out


def palette_blocks(n: int, seed: int) -> np.ndarray:
    """tiny_random-like images: 4x4-px blocks of random palette colours, mostly white."""
    rng = np.random.default_rng(seed)
    palette = np.array([shapes.BACKGROUND] * 6 + list(shapes.COLORS.values()), np.uint8)
    blocks = palette[rng.integers(0, len(palette), size=(n, 16, 16))]
    return blocks.repeat(4, axis=1).repeat(4, axis=2)


def write_run(root: Path, images: np.ndarray, refs: np.ndarray | None, config: str = CONFIG,
              coco: bool = True) -> tuple[Path, Path]:
    """A decode run dir (config.yaml, samples.jsonl, images/) + a reference folder of real images."""
    run, ref = root / "run", root / "ref"
    (run / "images").mkdir(parents=True)
    ref.mkdir()
    (run / "config.yaml").write_text(config)
    lines = []
    for i, img in enumerate(images):
        Image.fromarray(img).save(run / "images" / f"{i:05d}.png")
        rec = {"idx": i, "sample": 0, "prompt": "a circle", "category": "single_object",
               "image": f"images/{i:05d}.png"}
        if coco:
            rec.update(coco_image_id=1000 + i, coco_file_name=f"{1000 + i:012d}.png")
        lines.append(json.dumps(rec) + "\n")
    (run / "samples.jsonl").write_text("".join(lines))
    for i, img in enumerate(refs if refs is not None else []):
        Image.fromarray(img).save(ref / f"{1000 + i:012d}.png")
    return run, ref


def shapes_opts(ref: Path, tmp_path: Path, **kw) -> dict:
    return {"reference_dir": str(ref), "features": "shapes", "cache_dir": str(tmp_path / "cache"), **kw}


def test_fid_end_to_end_on_shapes_features(tmp_path):
    run_dir, ref = write_run(tmp_path, caption_renders(40, scene_seed=1), caption_renders(40, scene_seed=2))
    res = fid.fid_metric(load_run(run_dir), shapes_opts(ref, tmp_path))
    assert res["fid_n_real"] == 40 and res["fid_n_generated"] == 40 and res["fid_n_unreadable"] == 0
    assert res["fid_features"].startswith("shapes_features@") and res["fid_resize"] == "clean"
    noise_dir, _ = write_run(tmp_path / "noise", palette_blocks(40, 3), None)
    noise = fid.fid_metric(load_run(noise_dir), shapes_opts(ref, tmp_path))
    assert 0 < res["fid"] < 0.3 * noise["fid"], (res["fid"], noise["fid"])


def _fid_arrays(extractor, real: np.ndarray, fake: np.ndarray) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    m = FrechetInceptionDistance(feature=extractor)
    with torch.no_grad():
        m.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)  # uint8 [N, 3, 64, 64]
        m.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    return float(m.compute())


def test_shapes_features_rank_true_renders_far_below_noise():
    from models.shapes_features import load_shapes_features

    net = load_shapes_features()
    ref = caption_renders(300, scene_seed=11)
    same_captions = _fid_arrays(net, ref, caption_renders(300, scene_seed=12))
    noise = _fid_arrays(net, ref, palette_blocks(300, 13))
    itself = _fid_arrays(net, ref, ref)
    assert abs(itself) < 0.01 * same_captions
    assert same_captions < 0.2 * noise, (same_captions, noise)


def test_shapes_features_take_uint8_or_float_at_any_size():
    from models.shapes_features import load_shapes_features

    net = load_shapes_features()
    x = torch.from_numpy(caption_renders(4, scene_seed=5)).permute(0, 3, 1, 2)
    f8 = net(x)
    assert f8.shape == (4, net.num_features)
    torch.testing.assert_close(net(x.float()), f8)
    big = torch.nn.functional.interpolate(x.float(), size=(128, 128), mode="nearest")
    assert (net(big) - f8).abs().mean() < 0.1 * f8.abs().mean()


def test_reference_statistics_are_cached_and_real_images_read_once(tmp_path, monkeypatch):
    run_dir, ref = write_run(tmp_path, caption_renders(12, 1), caption_renders(12, 2))
    opened = []
    real_read = fid.read_rgb
    monkeypatch.setattr(fid, "read_rgb", lambda p: opened.append(p) or real_read(p))
    first = fid.fid_metric(load_run(run_dir), shapes_opts(ref, tmp_path))
    assert len(opened) == 12 and len(list((tmp_path / "cache").glob("ref_*.pt"))) == 1
    second = fid.fid_metric(load_run(run_dir), shapes_opts(ref, tmp_path))
    assert len(opened) == 12 and second["fid"] == pytest.approx(first["fid"], rel=1e-9)
    fid.fid_metric(load_run(run_dir), shapes_opts(ref, tmp_path, resize="pytorch_fid"))  # another key
    assert len(opened) == 24 and len(list((tmp_path / "cache").glob("ref_*.pt"))) == 2


def test_a_corrupt_png_is_named_and_the_others_scored(tmp_path):
    run_dir, ref = write_run(tmp_path, caption_renders(10, 1), caption_renders(10, 2))
    (run_dir / "images" / "00003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    res = fid.fid_metric(load_run(run_dir), shapes_opts(ref, tmp_path))
    assert res["fid_n_generated"] == 9 and res["fid_n_unreadable"] == 1
    assert "00003.png" in res["fid_unreadable"][0] and np.isfinite(res["fid"])


@pytest.mark.parametrize("case, error, words", [
    ("not_coco", ValueError, "decoded from prompts=shapes_eval; FID needs a COCO-format prompt set"),
    ("no_reference_dir", FileNotFoundError, "does not exist"),
    ("fewer_real", FileNotFoundError, "first missing: 000000001005.png"),
    ("count_mismatch", ValueError, "allow_count_mismatch=true"),
    ("no_inception", FileNotFoundError, fid.INCEPTION_URL),
    ("torch_fidelity", ValueError, "inception_source=clean_fid"),
    ("bad_option", ValueError, "unknown fid option"),
])
def test_bad_inputs_fail_with_the_fix(tmp_path, monkeypatch, case, error, words):
    n_ref = 5 if case == "fewer_real" else 8
    config = "prompts:\n  name: shapes_eval\n  kind: shapes\n" if case == "not_coco" else CONFIG
    run_dir, ref = write_run(tmp_path, caption_renders(8, 1), caption_renders(n_ref, 2), config=config,
                             coco=case != "not_coco")
    run = load_run(run_dir)
    opts = shapes_opts(ref, tmp_path)
    if case == "no_reference_dir":
        opts["reference_dir"] = str(tmp_path / "nowhere")
    if case == "count_mismatch":  # two samples of each prompt
        run = type(run)(run.run_dir, run.config, run.records + [{**r, "sample": 1} for r in run.records])
    if case == "no_inception":
        monkeypatch.delenv(fid.INCEPTION_ENV, raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
        opts.update(features="inception")
    if case == "torch_fidelity":
        monkeypatch.setitem(__import__("sys").modules, "torch_fidelity", None)
        opts.update(features="inception", inception_source="torch_fidelity")
    if case == "bad_option":
        opts["reszie"] = "clean"
    with pytest.raises(error) as e:
        fid.fid_metric(run, opts)
    assert words in str(e.value)


def test_count_mismatch_is_allowed_when_asked(tmp_path):
    run_dir, ref = write_run(tmp_path, caption_renders(6, 1), caption_renders(6, 2))
    run = load_run(run_dir)
    run = type(run)(run.run_dir, run.config, run.records + [{**r, "sample": 1} for r in run.records])
    res = fid.fid_metric(run, shapes_opts(ref, tmp_path, allow_count_mismatch=True))
    assert res["fid_n_generated"] == 12 and res["fid_n_real"] == 6


class _StandIn(torch.nn.Module):
    """clean-fid's calling convention: ``layers`` maps (x - 128) / 128 at 299 px to [N, C, 1, 1] (C = 2048 there,
    16 here: the 2048-d FID's eigendecomposition alone takes tens of seconds on 2 cores)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Conv2d(3, 16, 4))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def test_inception_path_runs_on_a_torchscript_stand_in(tmp_path, monkeypatch):
    torch.manual_seed(0)
    script = torch.jit.script(_StandIn().eval())
    seen = []
    script_file = tmp_path / "w" / fid.INCEPTION_FILE
    script_file.parent.mkdir()
    script.save(str(script_file))
    real_layers = fid.CleanFidInception.forward

    def spy(self, x):
        seen.append((tuple(x.shape), x.dtype, float(x.min()), float(x.max())))
        return real_layers(self, x)

    monkeypatch.setattr(fid.CleanFidInception, "forward", spy)
    monkeypatch.setattr(fid.CleanFidInception, "num_features", 16)
    monkeypatch.setenv(fid.INCEPTION_ENV, str(script_file.parent))  # a folder holding the file works too
    run_dir, ref = write_run(tmp_path, caption_renders(6, 1), caption_renders(6, 2))
    res = fid.fid_metric(load_run(run_dir), {"reference_dir": str(ref), "cache_dir": str(tmp_path / "c")})
    assert res["fid_features"].startswith("clean_fid_inception@") and np.isfinite(res["fid"])
    assert res["fid_n_real"] == res["fid_n_generated"] == 6
    assert len(seen) == 2 and all(s[:2] == ((6, 3, 299, 299), torch.float32) and 0 <= s[2] and s[3] <= 255 for s in seen)


@pytest.mark.parametrize("resize", ["clean", "pytorch_fid"])
def test_resize_conventions_give_299px_floats(resize):
    images = list(caption_renders(2, 1))
    x = fid.RESIZERS[resize](images, 299)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 255 + 1e-3  # float rounding of the resize (thread count)
    flat = fid.RESIZERS[resize]([np.full((64, 64, 3), 77, np.uint8)], 299)
    torch.testing.assert_close(flat, torch.full_like(flat, 77.0))
    same = fid.RESIZERS[resize](images, 64)  # the native size is left as it is
    torch.testing.assert_close(same, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float())


def test_the_two_resize_conventions_differ_as_documented():
    images = list(caption_renders(2, 1))
    clean, bilinear = fid.RESIZERS["clean"](images, 299), fid.RESIZERS["pytorch_fid"](images, 299)
    assert (clean - bilinear).abs().max() > 1  # bicubic vs bilinear at the shape edges
    assert (clean != clean.round()).any()  # clean-fid does not re-quantise to uint8
    lo, hi = float(np.min(images)), float(np.max(images))
    assert lo <= float(bilinear.min()) and float(bilinear.max()) <= hi + 1e-3  # float rounding (thread count)
