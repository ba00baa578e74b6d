"""A small CNN image feature network for the shapes world: the Inception of ``fid`` on shapes runs.

Inception-v3 features mean little on 64x64 flat-colour scenes, so the shapes world gets its own
extractor, trained by the project on rendered scenes with a semantic target: for each of the 9 grid
cells, which object is there (empty, or one of 3 shapes x 6 colours; a 19-way class per cell). The
features are the 128-d layer before that head, so two image sets are close when they hold the same
kinds of objects in the same kinds of places. Input as ``torchmetrics``' FID hands it over with
``normalize=False``: ``[N, 3, H, W]`` uint8, or float on the same 0..255 scale (clean-fid's); other
sizes are resized to 64 inside. ``python -m models.shapes_features --steps N`` re-trains it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data import shapes

WEIGHTS_DIR = Path(__file__).with_name("weights") / "shapes_features"
WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.json"
N_CELLS = 9
N_CLASSES = 1 + len(shapes.SHAPES) * len(shapes.COLORS)  # 0 = empty cell
NUM_FEATURES = 128


MODEL_TEXT = ("ShapesFeatures(width=32): conv3x3 s2 16, conv 32, pool, conv 64, pool, conv 128, pool (4x4) -> "
              "linear 2048->128 = the features; train head relu -> linear 128 -> 9 cells x 19 classes")


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (the recipe then reads the same on every clone)."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


class ShapesFeatures(nn.Module):
    """uint8 / 0..255 float ``[N, 3, H, W]`` -> features ``[N, 128]`` (``head`` gives the cell logits)."""

    num_features = NUM_FEATURES
    input_size = shapes.IMAGE_SIZE

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.trunk = nn.Sequential(  # 64 -> 32 (strided) -> 16 -> 8 -> 4 px; objects are 16 px
            nn.Conv2d(3, w // 2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w // 2, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.embed = nn.Linear(4 * w * 4 * 4, NUM_FEATURES)
        self.head = nn.Linear(NUM_FEATURES, N_CELLS * N_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.embed(self.trunk(x - 0.5).flatten(1))  # [N, 128]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def cell_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x))).view(-1, N_CELLS, N_CLASSES)  # [N, 9, 19]


def cell_targets(scene: shapes.Scene) -> np.ndarray:
    """int64 [9]: per grid cell (row-major) 0 = empty, else 1 + shape index * 6 + colour index."""
    out = np.zeros(N_CELLS, dtype=np.int64)
    centres = np.asarray(shapes.GRID_CENTRES_PX)
    colours = list(shapes.COLORS)
    for o in scene.objects:
        row, col = int(np.abs(centres - o.cy).argmin()), int(np.abs(centres - o.cx).argmin())
        out[row * 3 + col] = 1 + shapes.SHAPES.index(o.shape) * len(colours) + colours.index(o.color)
    return out


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [n, 3, 64, 64], cell targets [n, 9]) of ``n`` seeded scenes (uniform categories)."""
    images = np.empty((n, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3), dtype=np.uint8)
    targets = np.empty((n, N_CELLS), dtype=np.int64)
    for i in range(n):
        _, _, scene = shapes.example(seed, i)
        images[i], targets[i] = shapes.render(scene), cell_targets(scene)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(targets)


def augment(x: torch.Tensor, g: torch.Generator, noise: float) -> torch.Tensor:
    """Pixel noise (std ``noise`` on 0..255) so that the features stay smooth on imperfect generations."""
    return (x.float() + noise * torch.randn(x.shape, generator=g)).clamp(0, 255)


@torch.no_grad()
def evaluate(model: ShapesFeatures, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Cell accuracy and whole-image accuracy (all 9 cells right) on held-out scenes."""
    model.eval()
    pred = torch.cat([model.cell_logits(images[i:i + 256]).argmax(-1) for i in range(0, len(images), 256)])
    ok = pred == targets
    return {"cell_accuracy": ok.float().mean().item(), "image_accuracy": ok.all(-1).float().mean().item()}


def train(steps: int = 600, batch_size: int = 64, lr: float = 2e-3, n_train: int = 20000, n_val: int = 1000,
          seed: int = 0, noise: float = 8.0, threads: int = 2, out_dir: str | Path = WEIGHTS_DIR) -> dict:
    """Train on seeded renders (AdamW, cosine lr), save ``model.safetensors`` + ``recipe.json``; the recipe."""
    from safetensors.torch import save_file

    recipe = {k: v for k, v in locals().items() if k != "save_file"}
    recipe["out_dir"] = _shown(Path(out_dir))
    recipe["model"] = MODEL_TEXT
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    x_train, y_train = make_data(n_train, seed)
    x_val, y_val = make_data(n_val, seed + 1)
    model = ShapesFeatures()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        model.train()
        idx = torch.randint(0, n_train, (batch_size,), generator=g)
        logits = model.cell_logits(augment(x_train[idx], g, noise))
        loss = F.cross_entropy(logits.reshape(-1, N_CLASSES), y_train[idx].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    metrics = {"final_loss": loss.item(), **evaluate(model, x_val, y_val), "train_s": time.perf_counter() - t0}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
    result = {"recipe": recipe, "metrics": metrics, "torch": torch.__version__}
    (out_dir / RECIPE_FILE).write_text(json.dumps(result, indent=1) + "\n")
    return result


def load_shapes_features(path: str | Path | None = None) -> ShapesFeatures:
    """The trained extractor (eval mode) from ``path`` (a folder or the .safetensors file; default: committed)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS_DIR
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"shapes feature weights {file} not found; train them with "
                                "`python -m models.shapes_features` (a few minutes on CPU)")
    model = ShapesFeatures()
    model.load_state_dict(load_file(str(file)))
    return model.eval().requires_grad_(False)


def main() -> None:
    p = argparse.ArgumentParser(description="train the shapes image feature network (FID on shapes runs)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(WEIGHTS_DIR))
    a = p.parse_args()
    res = train(steps=a.steps, batch_size=a.batch_size, n_train=a.n_train, seed=a.seed, out_dir=a.out_dir)
    print(json.dumps(res["metrics"]))


if __name__ == "__main__":
    main()
