"""train.data: image-caption pairs -> pre-tokenised shards with each model's own VQ and prompt template."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import fit_image, load_shards, main, open_source, prepare_shards, shard_dirs

CAPTIONS = ["a red circle", "two blue squares", "a green triangle left of a red square", "one yellow circle",
            "three purple triangles"]


def _image(seed: int, size=(80, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture()
def jsonl_folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    lines = []
    for i, cap in enumerate(CAPTIONS):
        name = f"sub/{i}.png" if i % 2 else f"{i}.jpg"
        _image(i).save(root / name)
        lines.append(json.dumps({"file": name, "caption": cap}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n\n")
    return root


@pytest.fixture(scope="module")
def lumina():
    from models.lumina_mgpt import LuminaMGPTConfig, build_random

    return build_random(LuminaMGPTConfig(name="lumina_tiny", path=None, image_size=64, dtype="float32",
                                         random_init=True))


@pytest.fixture(scope="module")
def tiny():
    """The tiny shapes model with a random PatchVQ (4 px patches, 16 codes)."""
    from data.shapes import VOCAB
    from models.shapes_vq import PatchVQ
    from models.tiny import TinyConfig, build

    vq = PatchVQ(torch.rand(16, 4 * 4 * 3, generator=torch.Generator().manual_seed(0)) * 255, patch=4)
    return build(TinyConfig(words=tuple(VOCAB), n_codes=16, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=64), vq=vq, image_size=16)


class CountingEncodes:
    def __init__(self, inner):
        self.inner, self.n_encoded = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_image(self, image):
        self.n_encoded += 1
        return self.inner.encode_image(image)


def _expected_row(adapter, image, caption):
    prompt = list(adapter.prompt_ids(caption))
    return prompt + adapter.encode_image(fit_image(image, adapter.image_size)).tolist(), len(prompt)


# ---------------------------------------------------------------------------------------------------


def test_fit_image_resizes_and_center_crops():
    wide = np.zeros((40, 120, 3), dtype=np.uint8)
    wide[:, 40:80] = (255, 0, 0)  # a red middle third
    out = fit_image(Image.fromarray(wide), 32)
    assert out.size == (32, 32) and out.mode == "RGB"
    arr = np.asarray(out)
    assert arr[:, 4:28, 0].min() > 200  # the center crop keeps the red middle
    big = fit_image(_image(1, (1000, 700)), 64)
    assert big.size == (64, 64)
    clear = fit_image(Image.new("RGBA", (50, 50), (0, 0, 255, 0)), 16)
    assert clear.getpixel((8, 8)) == (255, 255, 255)  # transparent -> white


def test_jsonl_folder_to_shards(tmp_path, jsonl_folder, lumina):
    dirs = prepare_shards(lumina, jsonl_folder, tmp_path / "out", shard_size=2, progress=False)
    assert [d.name for d in dirs] == ["shard_00000", "shard_00001", "shard_00002"]
    ds = load_shards(tmp_path / "out")
    assert len(ds) == 5 and set(ds.column_names) == {"input_ids", "prompt_len"}
    for i, cap in enumerate(CAPTIONS):
        name = f"sub/{i}.png" if i % 2 else f"{i}.jpg"
        ids, n_prompt = _expected_row(lumina, Image.open(jsonl_folder / name), cap)
        assert ds[i]["input_ids"] == ids and ds[i]["prompt_len"] == n_prompt
        assert len(ids) - n_prompt == lumina.layout.n_tokens == 25
        assert lumina.layout.violations(torch.tensor(ids[n_prompt:])) == []
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model"] == "lumina_tiny" and manifest["image_tokens"] == 25 and manifest["n_items"] == 5


def test_resume_skips_finished_shards(tmp_path, jsonl_folder, lumina):
    import shutil

    out = tmp_path / "out"
    prepare_shards(lumina, jsonl_folder, out, shard_size=2, progress=False)
    first = load_shards(out)["input_ids"]
    shutil.rmtree(out / "shard_00001")
    (out / "shard_00002.tmp").mkdir()  # debris of an interrupted write
    counting = CountingEncodes(lumina)
    prepare_shards(counting, jsonl_folder, out, shard_size=2, progress=False)
    assert counting.n_encoded == 2  # only the missing shard was redone
    assert load_shards(out)["input_ids"] == first
    counting.n_encoded = 0
    prepare_shards(counting, jsonl_folder, out, shard_size=2, progress=False)
    assert counting.n_encoded == 0


def test_other_settings_in_the_same_out_dir_are_refused(tmp_path, jsonl_folder, lumina):
    prepare_shards(lumina, jsonl_folder, tmp_path / "out", shard_size=2, progress=False)
    with pytest.raises(ValueError, match="other settings.*shard_size"):
        prepare_shards(lumina, jsonl_folder, tmp_path / "out", shard_size=3, progress=False)


@pytest.mark.parametrize("line, match", [
    ("{not json", r"captions.jsonl:2: not valid JSON"),
    ('{"file": "0.jpg"}', r"captions.jsonl:2: expected an object with string fields"),
    ('{"file": "missing.png", "caption": "x"}', r"captions.jsonl:2: image .*missing.png does not exist"),
])
def test_malformed_caption_file(tmp_path, line, match):
    _image(0).save(tmp_path / "0.jpg")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "0.jpg", "caption": "a"}) + "\n" + line + "\n")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        open_source(tmp_path)


def test_sidecar_captions(tmp_path, lumina):
    for i in range(3):
        _image(i).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(CAPTIONS[i] + "\n")
    pairs = open_source(tmp_path)
    assert [p.caption for p in pairs] == CAPTIONS[:3]
    _image(9).save(tmp_path / "9.png")
    with pytest.raises(FileNotFoundError, match=r"no caption file, e.g. .*9\.txt"):
        open_source(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        open_source(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        open_source(tmp_path / "nowhere")


def test_datasets_source_object_and_disk(tmp_path, lumina):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"img": [_image(i) for i in range(3)], "caption": CAPTIONS[:3]},
        features=datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")}),
    )
    prepare_shards(lumina, ds, tmp_path / "a", shard_size=10, image_column="img", text_column="caption",
                   progress=False)
    ds.save_to_disk(str(tmp_path / "disk"))
    prepare_shards(lumina, tmp_path / "disk", tmp_path / "b", shard_size=10, image_column="img",
                   text_column="caption", progress=False)
    a, b = load_shards(tmp_path / "a"), load_shards(tmp_path / "b")
    assert a["input_ids"] == b["input_ids"]
    assert a[1]["input_ids"] == _expected_row(lumina, ds[1]["img"], CAPTIONS[1])[0]
    with pytest.raises(KeyError, match="no column 'image'.*image_column"):
        open_source(ds)


def test_emu3_and_tiny_adapters(tmp_path, jsonl_folder, tiny):
    from models.emu3 import Emu3Config, build_random

    emu = build_random(Emu3Config(name="emu_tiny", path=None, image_size=64, dtype="float32", random_init=True))
    prepare_shards(emu, jsonl_folder, tmp_path / "emu", limit=2, progress=False)
    rows = load_shards(tmp_path / "emu")
    assert len(rows) == 2
    row = rows[0]
    assert row["input_ids"][: row["prompt_len"]] == emu.prompt_ids(CAPTIONS[0])
    assert emu.layout.violations(torch.tensor(row["input_ids"][row["prompt_len"]:])) == []

    prepare_shards(tiny, jsonl_folder, tmp_path / "tiny", shard_size=4, progress=False)
    rows = load_shards(tmp_path / "tiny")
    assert len(rows) == 5 and len(shard_dirs(tmp_path / "tiny")) == 2
    ids, n = _expected_row(tiny, Image.open(jsonl_folder / "sub/3.png"), CAPTIONS[3])
    assert rows[3]["input_ids"] == ids and rows[3]["prompt_len"] == n
    assert len(ids) - n == tiny.layout.n_tokens


def test_caption_outside_the_vocabulary_names_the_pair(tmp_path, tiny):
    _image(0).save(tmp_path / "0.png")
    (tmp_path / "0.txt").write_text("a zebra")
    with pytest.raises(ValueError, match="zebra") as err:
        prepare_shards(tiny, tmp_path, tmp_path / "out", progress=False)
    if hasattr(err.value, "add_note"):  # Python >= 3.11
        assert any("0.png" in note for note in err.value.__notes__)


def test_cli(tmp_path, jsonl_folder):
    dirs = main([f"source={jsonl_folder}", f"out_dir={tmp_path / 'cli'}", "model=lumina_mgpt_tiny_random",
                 "model.image_size=64", "shard_size=3", "progress=false"])
    assert len(dirs) == 2 and len(load_shards(tmp_path / "cli")) == 5
    with pytest.raises(SystemExit, match="unknown argument"):
        main([f"source={jsonl_folder}", f"out_dir={tmp_path / 'x'}", "model=lumina_mgpt_tiny_random", "shards=3"])
    with pytest.raises(SystemExit, match="missing out_dir"):
        main([f"source={jsonl_folder}", "model=lumina_mgpt_tiny_random"])
