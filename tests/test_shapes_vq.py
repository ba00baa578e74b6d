"""The shapes patch VQ: fit, round trip through the checker, save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data import shapes as S
from data import shapes_check as C
from models.shapes_vq import DEFAULT_N_CODES, PatchVQ, fit


@pytest.fixture(scope="module")
def vq() -> PatchVQ:
    _, _, train = S.dataset_arrays(400, seed=1)
    return fit(train, n_codes=DEFAULT_N_CODES, seed=0)


@pytest.fixture(scope="module")
def held_out():
    """Scenes of the eval prompts (unseen seeds): captions and images [N, 64, 64, 3]."""
    captions, images = [], []
    for row in S.load_eval_prompts():
        spec = S.parse_caption(row["prompt"])
        captions.append(row["prompt"])
        images.append(S.render(S.scene_for(np.random.default_rng([77, row["idx"]]), spec)))
    return captions, np.stack(images)


def test_shapes_and_dtypes(vq):
    img = S.render(S.example(0, 0)[2])
    codes = vq.encode(img)
    assert codes.dtype == torch.long and tuple(codes.shape) == (16, 16)
    assert 0 <= int(codes.min()) and int(codes.max()) < vq.n_codes
    assert tuple(vq.codebook.shape) == (DEFAULT_N_CODES, 4 * 4 * 3) and vq.codebook.dtype == torch.float32
    out = vq.decode_array(codes)
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
    assert vq.decode(codes).size == (64, 64)
    assert torch.equal(vq.encode(S.to_pil(img)), codes)


def test_round_trip_keeps_checker_score(vq, held_out):
    captions, images = held_out
    recon = vq.decode_array(vq.encode_batch(images))  # [N, 64, 64, 3]
    scores = C.score([C.check(img, cap) for img, cap in zip(recon, captions)])
    assert scores["overall"] >= 0.95, scores
    mse = float(((recon.astype(np.float64) - images) ** 2).mean())
    assert 10 * np.log10(255**2 / max(mse, 1e-12)) > 28.0


def test_batch_equals_single(vq, held_out):
    _, images = held_out
    batch = vq.encode_batch(images[:5])
    for i in range(5):
        assert torch.equal(batch[i], vq.encode(images[i]))
    assert np.array_equal(vq.decode_array(batch)[2], vq.decode_array(batch[2]))


def test_decoding_a_codeword_grid_is_stable(vq):
    """decode then encode returns the same codes (codewords are their own nearest neighbours)."""
    codes = torch.randint(0, vq.n_codes, (16, 16), generator=torch.Generator().manual_seed(0))
    uniq = torch.unique(vq.codebook.round(), dim=0).shape[0]
    again = vq.encode(vq.decode_array(codes))
    if uniq == vq.n_codes:  # all codewords distinct
        assert torch.equal(again, codes)
    assert np.array_equal(vq.decode_array(again), vq.decode_array(codes))


def test_fit_is_deterministic_and_seed_matters():
    _, _, train = S.dataset_arrays(200, seed=2)
    a = fit(train, n_codes=16, seed=0)
    b = fit(train, n_codes=16, seed=0)
    c = fit(train, n_codes=16, seed=1)
    assert torch.equal(a.codebook, b.codebook)
    assert not torch.equal(a.codebook, c.codebook)


def test_codewords_are_palette_patches(vq):
    """Medoid codewords decode to flat palette colours only (what the checker reads)."""
    palette = {S.BACKGROUND, *S.COLORS.values()}
    pixels = vq.codebook.reshape(-1, 3).round().to(torch.int64).tolist()
    assert {tuple(p) for p in pixels} <= palette


def test_save_load_identical(vq, tmp_path):
    path = vq.save(tmp_path / "vq.safetensors")
    loaded = PatchVQ.load(path)
    assert torch.equal(loaded.codebook, vq.codebook)
    assert loaded.patch == vq.patch and loaded.n_codes == vq.n_codes


def test_patch_size_survives_save_load(tmp_path):
    _, _, train = S.dataset_arrays(50, seed=3)
    vq8 = fit(train, n_codes=8, patch=8, seed=0)
    loaded = PatchVQ.load(vq8.save(tmp_path / "p8.safetensors"))
    assert loaded.patch == 8 and tuple(loaded.encode(train[0]).shape) == (8, 8)


def test_missing_file_names_path_and_fix(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match="make tiny-model") as err:
        PatchVQ.load(path)
    assert str(path) in str(err.value)


def test_bad_inputs_raise(vq):
    with pytest.raises(ValueError, match="multiple"):
        vq.encode(np.zeros((30, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="codes must lie"):
        vq.decode_array(torch.full((16, 16), vq.n_codes))
