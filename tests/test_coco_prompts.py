"""COCO prompt sets (pycocotools): the longest caption per image, the seeded 30k draw, image ids and file
names carried into every record, and clear errors for files that do not fit."""
import json
from pathlib import Path

import numpy as np
import pytest

from data.prompts import PromptSetError, load_prompts


def _coco_file(path: Path, n_images: int, caps_per_image: int, year: int = 2017) -> Path:
    anns, rng = [], np.random.default_rng(1)
    for img in range(n_images):
        for c in range(caps_per_image):
            words = int(rng.integers(2, 12))
            anns.append({"image_id": 1000 + img, "id": len(anns), "caption": " ".join(["w"] * words) + f" {c}"})
    rng.shuffle(anns)
    images = [{"id": 1000 + i, "file_name": f"{1000 + i:012d}.jpg"} for i in range(n_images)]
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def test_coco2017_takes_the_longest_caption_of_every_image(tmp_path):
    path = _coco_file(tmp_path / "captions_val2017.json", n_images=7, caps_per_image=5)
    anns = json.loads(path.read_text())["annotations"]
    prompts = load_prompts({"kind": "coco_longest", "name": "coco2017_5k", "path": str(path)})
    assert [p.meta["image_id"] for p in prompts] == sorted({a["image_id"] for a in anns})
    for p in prompts:
        lengths = [len(a["caption"]) for a in anns if a["image_id"] == p.meta["image_id"]]
        assert len(p.prompt) == max(lengths)
        assert p.meta["file_name"] == f"{p.meta['image_id']:012d}.jpg"


def test_coco2014_sample_is_seeded_and_draws_distinct_images(tmp_path):
    path = _coco_file(tmp_path / "captions_val2014.json", n_images=40, caps_per_image=5)
    cfg = {"kind": "coco_sample", "name": "coco2014_30k", "path": str(path), "n": 30, "sample_seed": 0}
    a, b = load_prompts(cfg), load_prompts(cfg)
    c = load_prompts({**cfg, "sample_seed": 1})
    assert [p.prompt for p in a] == [p.prompt for p in b] and [p.prompt for p in a] != [p.prompt for p in c]
    assert len({p.meta["image_id"] for p in a}) == 30
    with pytest.raises(PromptSetError, match="fewer than prompts.n"):
        load_prompts({**cfg, "n": 41})


def test_image_dir_must_hold_every_image_the_captions_name(tmp_path):
    path = _coco_file(tmp_path / "captions_val2017.json", n_images=4, caps_per_image=2)
    folder = tmp_path / "val2017"
    folder.mkdir()
    cfg = {"kind": "coco_longest", "name": "coco2017_5k", "path": str(path), "image_dir": str(folder)}
    for i in range(3):
        (folder / f"{1000 + i:012d}.jpg").write_bytes(b"x")
    with pytest.raises(PromptSetError, match=r"1 of 4 images .* not in prompts.image_dir.*first: 000000001003.jpg"):
        load_prompts(cfg)
    (folder / "000000001003.jpg").write_bytes(b"x")
    assert len(load_prompts(cfg)) == 4


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"images": [], "annotations": []}), "no 'annotations'"),
    (json.dumps({"images": [], "annotations": [{"image_id": 1, "id": 0, "caption": "x"}]}), "lacks"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "id": 0}]}),
     "needs image_id, id and caption"),
])
def test_malformed_captions_files_are_refused_with_the_fix(tmp_path, content, message):
    path = tmp_path / "captions_val2017.json"
    path.write_text(content)
    with pytest.raises(PromptSetError, match=message) as e:
        load_prompts({"kind": "coco_longest", "name": "coco2017_5k", "path": str(path)})
    assert "captions_val2017.json" in str(e.value)


def test_shapes_coco_set_is_a_coco_captions_set_and_records_carry_its_ids(tmp_path):
    from core.config import compose_config
    from data import shapes
    from data.shapes_check import check
    from data.shapes_coco import CAPTIONS, IMAGES, write_render_run
    from decode.run import decode_run

    root = tmp_path / "set"
    prompts = load_prompts({"kind": "shapes_coco", "name": "shapes_coco", "root": str(root)})
    eval_rows = shapes.load_eval_prompts()
    assert [p.prompt for p in prompts] == [r["prompt"] for r in eval_rows]
    captions = json.loads((root / CAPTIONS).read_text())
    assert len(captions["images"]) == len(captions["annotations"]) == len(eval_rows)
    # the reference renders satisfy their captions (the checker reads them back)
    from PIL import Image
    for p in prompts[:30]:
        with Image.open(root / IMAGES / p.meta["file_name"]) as im:
            assert check(im.convert("RGB"), p.prompt)["correct"], p.prompt
    run = tmp_path / "run"
    decode_run(compose_config(["model=tiny", "decoder=ar", "prompts=shapes_coco", f"prompts.root={root}",
                               "prompts.limit=2", f"out_dir={run}", "warmup=false", "progress=false"]))
    recs = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [(r["coco_image_id"], r["coco_file_name"]) for r in recs] == \
        [(p.meta["image_id"], p.meta["file_name"]) for p in prompts[:2]]
    gt = write_render_run(tmp_path / "gt", root, scene_seed=1)
    gt_recs = [json.loads(line) for line in (gt / "samples.jsonl").read_text().splitlines()]
    assert len(gt_recs) == len(prompts) and (gt / gt_recs[0]["image"]).is_file()
    a, b = (Image.open(d / f) for d, f in [(root / IMAGES, prompts[0].meta["file_name"]), (gt, gt_recs[0]["image"])])
    assert a.tobytes() != b.tobytes()  # another draw of the same caption, not a copy of the reference
