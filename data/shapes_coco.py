"""The embedded world as a COCO-format validation set, so FID / CLIP score and the COCO tables run on it
exactly as on COCO (DESIGN.md section 7; issue "Stage 3 for real").

``write_shapes_coco(root)`` writes ``root/annotations/captions_val.json`` (COCO's captions schema: an
``images`` list with file names, an ``annotations`` list with one caption per image) and the renders
``root/val/<image id>.png``; the captions are the 200 shapes eval prompts (data/shapes_eval.jsonl), image
id = prompt idx + 1, and each image is a scene that satisfies its caption, drawn with ``scene_seed``.
The COCO loaders (``prompts=shapes_coco``: kind ``coco_longest``) then read it through pycocotools.

``write_render_run(run_dir, root, scene_seed)`` lays out renders of the same captions drawn with another
scene seed as a run dir (config.yaml, samples.jsonl, images/): the ground-truth row of the tables, i.e.
FID's floor for this set (an independent draw of the true conditional, not the reference images
themselves, which would score 0). ``python -m data.shapes_coco ROOT`` writes the set.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from core.rundir import CONFIG_FILE, atomic_write_bytes, image_name, save_image
from data import shapes

CAPTIONS = Path("annotations") / "captions_val.json"
IMAGES = Path("val")
SET_NAME = "shapes_coco"


def _render(caption: str, scene_seed: int, idx: int):
    rng = np.random.default_rng([scene_seed, idx])
    return shapes.to_pil(shapes.render(shapes.scene_for(rng, shapes.parse_caption(caption))))


def file_name(image_id: int) -> str:
    return f"{image_id:012d}.png"


def write_shapes_coco(root: str | Path, scene_seed: int = 0, limit: int | None = None) -> Path:
    """Write the set under ``root`` (idempotent: an existing complete set is kept); returns the captions file."""
    root = Path(root)
    rows = shapes.load_eval_prompts()[:limit]
    captions = root / CAPTIONS
    if captions.is_file():
        have = json.loads(captions.read_text())
        if (have.get("info", {}).get("scene_seed") == scene_seed and len(have["images"]) == len(rows)
                and all((root / IMAGES / im["file_name"]).is_file() for im in have["images"])):
            return captions
    (root / IMAGES).mkdir(parents=True, exist_ok=True)
    captions.parent.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for r in rows:
        image_id = int(r["idx"]) + 1
        save_image(_render(r["prompt"], scene_seed, int(r["idx"])), root / IMAGES / file_name(image_id))
        images.append({"id": image_id, "file_name": file_name(image_id), "width": shapes.IMAGE_SIZE,
                       "height": shapes.IMAGE_SIZE})
        anns.append({"id": image_id, "image_id": image_id, "caption": r["prompt"], "category": r["category"]})
    info = {"description": "sjd2 shapes eval prompts as a COCO captions set", "scene_seed": scene_seed}
    atomic_write_bytes(captions, json.dumps({"info": info, "images": images, "annotations": anns}).encode())
    return captions


def write_render_run(run_dir: str | Path, root: str | Path, scene_seed: int = 1, limit: int | None = None) -> Path:
    """The set's captions rendered with ``scene_seed`` as a run dir eval can score (no speed fields)."""
    from omegaconf import OmegaConf

    run_dir, root = Path(run_dir), Path(root)
    data = json.loads((root / CAPTIONS).read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    lines = []
    for a in sorted(data["annotations"], key=lambda a: a["image_id"])[:limit]:
        idx = int(a["image_id"]) - 1
        name = image_name(idx, 0, 1)
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        save_image(_render(a["caption"], scene_seed, idx), run_dir / name)
        rec: dict[str, Any] = {"idx": idx, "sample": 0, "prompt": a["caption"], "category": a.get("category"),
                               "seed": scene_seed, "model": "renders", "decoder": "ground_truth", "image": name,
                               "coco_image_id": a["image_id"], "coco_file_name": files[a["image_id"]]}
        lines.append(json.dumps(rec) + "\n")
    config = {"model": {"name": "renders"}, "decoder": {"name": "ground_truth"}, "sampling": {},
              "prompts": {"name": SET_NAME, "kind": "coco_longest", "path": str(root / CAPTIONS), "limit": limit},
              "seed": scene_seed}
    atomic_write_bytes(run_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(config)).encode())
    atomic_write_bytes(run_dir / "samples.jsonl", "".join(lines).encode())
    return run_dir


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="where the set goes, e.g. runs/cache/shapes_coco")
    ap.add_argument("--scene-seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--render-run", default=None, help="also write the ground-truth run dir here")
    args = ap.parse_args()
    print(write_shapes_coco(args.root, args.scene_seed, args.limit))
    if args.render_run:
        print(write_render_run(args.render_run, args.root, args.scene_seed + 1))
