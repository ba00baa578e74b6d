"""The eval stage's wandb logging: the side-by-side table and one image grid per run (``wandb.mode`` in
``conf/eval.yaml``; ``offline`` writes a local run that ``wandb sync`` uploads later, no network needed)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eval.images import Unreadable, iter_images


def image_grid(run: Any, n: int, cell: int = 128):
    """The first ``n`` readable images of a run tiled into one PIL image (4 per row)."""
    from PIL import Image

    images = [im for _, im in zip(range(n), (im for _, im in iter_images(run.run_dir, run.records, Unreadable())))]
    cols = min(4, max(len(images), 1))
    rows = max(1, -(-len(images) // cols))
    grid = Image.new("RGB", (cols * cell, rows * cell), "white")
    for i, im in enumerate(images):
        grid.paste(im.resize((cell, cell), Image.NEAREST), ((i % cols) * cell, (i // cols) * cell))
    return grid


def log_eval(wcfg: Mapping[str, Any], name: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
             runs: Sequence[Any], out_dir: Path) -> str:
    """Log the table (all rows) and each run's image grid to one wandb run; returns its local dir."""
    import wandb

    config = {"run_dirs": [str(r.run_dir) for r in runs], "table": name}
    run = wandb.init(mode=wcfg["mode"], project=wcfg["project"], entity=wcfg.get("entity"),
                     name=wcfg.get("name") or name, job_type="eval", dir=str(out_dir), config=config)
    try:
        run.log({f"{name}/table": wandb.Table(columns=list(header), data=[list(r) for r in rows])})
        grids = {}
        for r, label in zip(runs, (row[0] for row in rows)):
            caption = f"{r.config.get('model', {}).get('name')} / {r.config.get('decoder', {}).get('name')}"
            grids[f"{name}/images/{label}"] = wandb.Image(image_grid(r, int(wcfg.get("grid_images", 16))),
                                                          caption=caption)
        run.log(grids)
        return str(run.dir)
    finally:
        run.finish()
