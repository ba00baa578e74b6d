"""``shapes``: seeded synthetic captioned images, their caption grammar and evaluation prompts (a GenEval in
miniature; the rule-based checker that reads the pixels back is :mod:`data.shapes_check`).

Scenes are 1-4 flat-coloured circles, squares and triangles on a white 64x64 canvas, placed on a
3x3 grid of cells with a little jitter, so objects never overlap and keep a white margin between them.
Captions follow a small regular grammar (lowercase, no punctuation)::

    caption := np | np "and" np | np relation np
    np      := ("a" | "an" | "one") [colour] shape | ("two" | "three" | "four") [colour] shape "s"
    relation:= "left of" | "right of" | "above" | "below"

The six GenEval tags map onto it: single_object "a circle"; two_object "a circle and a square";
counting "three triangles"; colors "a blue square"; position "a circle left of a square";
color_attr "a red circle and a blue square".

"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------------
# The world

COLORS: dict[str, tuple[int, int, int]] = {  # pairwise RGB distance >= 106
    "red": (210, 20, 20),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 230, 0),
    "purple": (130, 40, 180),
    "orange": (255, 125, 0),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four")

# The tiny model's word tokenizer is built from VOCAB: never reorder it, only append.
VOCAB: tuple[str, ...] = (
    "a", "and", "one", "two", "three", "four",
    "circle", "square", "triangle", "circles", "squares", "triangles",
    "red", "green", "blue", "yellow", "purple", "orange",
    "left", "right", "of", "above", "below", "an",
)

IMAGE_SIZE = 64
# Geometry. Objects are aligned to the 4-px patch grid of the tokenizer (centres and half-sizes are
# multiples of 4), so all scenes use only 79 distinct 4x4 patches: a 64-code VQ reconstructs them with a
# checker score of 1.0 and the tiny AR model has little to learn besides the layout. Jitter 1 px and
# sizes 14-17 would give ~1000 distinct patches (a 256-code VQ then scores only ~0.92 on reconstructions).
GRID_CENTRES_PX: tuple[float, ...] = (12.0, 32.0, 52.0)  # cell centres on each axis (20 px apart)
JITTER_PX = 0  # integer jitter of a centre, each axis, uniform in [-JITTER_PX, JITTER_PX]
SIZE_RANGE_PX: tuple[int, int] = (16, 16)  # inclusive; white gap >= 20 - max size - 2 * jitter = 4 px

EVAL_PATH = Path(__file__).with_name("shapes_eval.jsonl")
EVAL_SEED = 20240607
EVAL_N_PROMPTS = 200

_PLURAL = {s: s + "s" for s in SHAPES}
_SINGULAR = {p: s for s, p in _PLURAL.items()}


@dataclass(frozen=True)
class Obj:
    """One object; ``cx``, ``cy`` are its bounding-box centre and ``size`` its side / diameter, in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]


@dataclass(frozen=True)
class Phrase:
    """A noun phrase: ``count`` None means "a" (at least one); an int means exactly that many."""

    shape: str
    color: str | None = None
    count: int | None = None

    def text(self) -> str:
        colour = f"{self.color} " if self.color else ""
        if self.count is None:
            rest = f"{colour}{self.shape}"
            return f"{'an' if rest[0] in 'aeiou' else 'a'} {rest}"
        noun = self.shape if self.count == 1 else _PLURAL[self.shape]
        return f"{NUMBERS[self.count - 1]} {colour}{noun}"


@dataclass(frozen=True)
class Spec:
    """A parsed caption: its category, its noun phrases, and the relation between phrase 0 and 1."""

    category: str
    phrases: tuple[Phrase, ...]
    relation: str | None = None

    def text(self) -> str:
        joiner = f" {self.relation} " if self.relation else " and "
        return joiner.join(p.text() for p in self.phrases)


# ---------------------------------------------------------------------------------------------------
# Sampling


def _cells(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """``n`` distinct (row, col) cells of the 3x3 grid."""
    flat = rng.choice(9, size=n, replace=False)
    return [(int(i) // 3, int(i) % 3) for i in flat]


def _place(rng: np.random.Generator, shape: str, color: str, cell: tuple[int, int]) -> Obj:
    row, col = cell
    jx, jy = rng.integers(-JITTER_PX, JITTER_PX + 1, size=2)
    size = int(rng.integers(SIZE_RANGE_PX[0], SIZE_RANGE_PX[1] + 1))
    return Obj(shape, color, GRID_CENTRES_PX[col] + float(jx), GRID_CENTRES_PX[row] + float(jy), float(size))


def _colour(rng: np.random.Generator) -> str:
    return str(rng.choice(list(COLORS)))


def _two_distinct(rng: np.random.Generator, items: Sequence[str]) -> tuple[str, str]:
    i, j = rng.choice(len(items), size=2, replace=False)
    return items[int(i)], items[int(j)]


def _relation_cells(rng: np.random.Generator, relation: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Cells (a, b) such that ``a <relation> b`` holds clearly: same row/column, different column/row."""
    line = int(rng.integers(3))
    lo, hi = sorted(int(i) for i in rng.choice(3, size=2, replace=False))
    if relation in ("left of", "right of"):
        a, b = (line, lo), (line, hi)
    else:  # above / below: smaller row index is higher up
        a, b = (lo, line), (hi, line)
    return (a, b) if relation in ("left of", "above") else (b, a)


def sample_spec(rng: np.random.Generator, category: str | None = None) -> Spec:
    """A random caption spec of ``category`` (uniform over CATEGORIES when None)."""
    if category is None:
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    if category == "single_object":
        return Spec(category, (Phrase(str(rng.choice(SHAPES))),))
    if category == "two_object":
        s1, s2 = _two_distinct(rng, SHAPES)
        return Spec(category, (Phrase(s1), Phrase(s2)))
    if category == "counting":
        return Spec(category, (Phrase(str(rng.choice(SHAPES)), count=int(rng.integers(1, 5))),))
    if category == "colors":
        return Spec(category, (Phrase(str(rng.choice(SHAPES)), _colour(rng)),))
    if category == "position":
        s1, s2 = _two_distinct(rng, SHAPES)
        return Spec(category, (Phrase(s1), Phrase(s2)), str(rng.choice(RELATIONS)))
    if category == "color_attr":
        s1, s2 = _two_distinct(rng, SHAPES)
        c1, c2 = _two_distinct(rng, list(COLORS))
        return Spec(category, (Phrase(s1, c1), Phrase(s2, c2)))
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def scene_for(rng: np.random.Generator, spec: Spec) -> Scene:
    """A scene satisfying ``spec``: unspecified colours random; exactly the objects the spec names."""
    wanted: list[tuple[str, str]] = []
    for p in spec.phrases:
        for _ in range(p.count or 1):
            wanted.append((p.shape, p.color or _colour(rng)))
    if len(wanted) > 4:
        raise ValueError(f"caption {spec.text()!r} needs {len(wanted)} objects; scenes hold at most 4")
    if spec.relation is not None:
        cells = list(_relation_cells(rng, spec.relation))
    else:
        cells = _cells(rng, len(wanted))
    return Scene(tuple(_place(rng, s, c, cell) for (s, c), cell in zip(wanted, cells)))


def sample_example(rng: np.random.Generator, category: str | None = None) -> tuple[str, str, Scene]:
    """(caption, category, scene), consistent with each other; category uniform when None."""
    spec = sample_spec(rng, category)
    return spec.text(), spec.category, scene_for(rng, spec)


# ---------------------------------------------------------------------------------------------------
# Rendering

_COORD_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in 64-px units: (y [size, 1], x [1, size])."""
    if size not in _COORD_CACHE:
        c = (np.arange(size, dtype=np.float32) + 0.5) * (IMAGE_SIZE / size)
        _COORD_CACHE[size] = (c[:, None], c[None, :])
    return _COORD_CACHE[size]


def shape_mask(shape: str, cx: float, cy: float, w: float, h: float,
               y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` filling the box (centre, w x h) at pixel centres ``y``, ``x``.

    Triangles point up (apex at the top middle, base along the bottom edge).
    """
    dx, dy = x - cx, y - cy  # broadcast to [H, W]
    if shape == "circle":
        return (dx / (w / 2)) ** 2 + (dy / (h / 2)) ** 2 <= 1.0
    if shape == "square":
        return (np.abs(dx) <= w / 2) & (np.abs(dy) <= h / 2)
    if shape == "triangle":
        t = (dy + h / 2) / h  # 0 at the apex row, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * w / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [size, size, 3]: flat colours on white, no anti-aliasing (scene coordinates are 64-px units)."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    y, x = _coords(size)
    for o in scene.objects:
        img[shape_mask(o.shape, o.cx, o.cy, o.size, o.size, y, x)] = COLORS[o.color]
    return img


def render_batch(scenes: Sequence[Scene], size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [B, size, size, 3]."""
    return np.stack([render(s, size) for s in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)


def to_pil(arr: np.ndarray):
    """uint8 [H, W, 3] -> PIL.Image (RGB)."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))


def example(seed: int, idx: int, category: str | None = None) -> tuple[str, str, Scene]:
    """Example ``idx`` of the stream seeded by ``seed`` (per-sample seed = (seed, idx))."""
    return sample_example(np.random.default_rng([seed, idx]), category)


def dataset(n: int, seed: int, category: str | None = None) -> Iterator[tuple[str, str, np.ndarray]]:
    """Yields ``n`` (caption, category, image uint8 [64, 64, 3]); example i depends only on (seed, i)."""
    for i in range(n):
        caption, cat, scene = example(seed, i, category)
        yield caption, cat, render(scene)


def dataset_arrays(n: int, seed: int, category: str | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """The same examples as ``dataset`` as (captions, categories, images uint8 [n, 64, 64, 3])."""
    captions, cats, images = [], [], np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, (caption, cat, img) in enumerate(dataset(n, seed, category)):
        captions.append(caption)
        cats.append(cat)
        images[i] = img
    return captions, cats, images


# ---------------------------------------------------------------------------------------------------
# Parsing

GRAMMAR = (
    "caption := np | np 'and' np | np relation np; "
    "np := ('a'|'an'|'one') [colour] shape | ('two'|'three'|'four') [colour] shape+'s'; "
    f"colour in {tuple(COLORS)}; shape in {SHAPES}; relation in {RELATIONS}"
)


def _grammar_error(text: str, why: str) -> ValueError:
    return ValueError(f"caption {text!r} is outside the shapes grammar ({why}); grammar: {GRAMMAR}")


def _parse_np(words: list[str], text: str) -> Phrase:
    if not words:
        raise _grammar_error(text, "empty noun phrase")
    det, rest = words[0], words[1:]
    if det in ("a", "an"):  # the article is not checked against the next word
        count = None
    elif det in NUMBERS:
        count = NUMBERS.index(det) + 1
    else:
        raise _grammar_error(text, f"a noun phrase must start with 'a', 'an' or a number, not {det!r}")
    color = None
    if len(rest) == 2 and rest[0] in COLORS:
        color, rest = rest[0], rest[1:]
    if len(rest) != 1:
        raise _grammar_error(text, f"bad noun phrase {' '.join(words)!r}")
    noun = rest[0]
    plural = count is not None and count > 1
    if plural and noun in _SINGULAR:
        return Phrase(_SINGULAR[noun], color, count)
    if not plural and noun in SHAPES:
        return Phrase(noun, color, count)
    raise _grammar_error(text, f"noun {noun!r} does not agree with {det!r} or is not a shape")


def _split_relation(words: list[str]) -> tuple[list[str], str, list[str]] | None:
    for i, w in enumerate(words):
        if w in ("above", "below"):
            return words[:i], w, words[i + 1:]
        if w in ("left", "right") and i + 1 < len(words) and words[i + 1] == "of":
            return words[:i], f"{w} of", words[i + 2:]
    return None


def _category(phrases: tuple[Phrase, ...], relation: str | None) -> str:
    if relation is not None:
        return "position"
    if len(phrases) == 2:
        return "color_attr" if any(p.color for p in phrases) else "two_object"
    (p,) = phrases
    if p.count is not None:
        return "counting"
    return "colors" if p.color else "single_object"


def parse_caption(text: str) -> Spec:
    """Parse a caption of the shapes grammar into a Spec; raises ValueError naming the grammar otherwise."""
    words = text.lower().split()
    split = _split_relation(words)
    relation = None
    if split is not None:
        left, relation, right = split
        phrases = (_parse_np(left, text), _parse_np(right, text))
        if any(p.count not in (None, 1) for p in phrases):
            raise _grammar_error(text, "a relation takes single objects")
    elif "and" in words:
        i = words.index("and")
        phrases = (_parse_np(words[:i], text), _parse_np(words[i + 1:], text))
    else:
        phrases = (_parse_np(words, text),)
    if sum(p.count or 1 for p in phrases) > 4:
        raise _grammar_error(text, "more than 4 objects")
    return Spec(_category(phrases, relation), phrases, relation)


# ---------------------------------------------------------------------------------------------------
# Evaluation prompts


def make_eval_prompts(n_per_category: int, seed: int, limit: int | None = None) -> list[dict]:
    """Balanced prompts [{idx, category, prompt}], categories interleaved so that ``limit`` keeps balance."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_per_category):
        for cat in CATEGORIES:
            rows.append(sample_spec(rng, cat))
    rows = rows[:limit] if limit is not None else rows
    return [{"idx": i, "category": s.category, "prompt": s.text()} for i, s in enumerate(rows)]


def write_eval_prompts(path: str | Path = EVAL_PATH) -> Path:
    """Regenerate the shipped ``shapes_eval.jsonl`` (200 prompts, fixed seed)."""
    path = Path(path)
    n_per = -(-EVAL_N_PROMPTS // len(CATEGORIES))
    with path.open("w") as f:
        for row in make_eval_prompts(n_per, EVAL_SEED, limit=EVAL_N_PROMPTS):
            f.write(json.dumps(row) + "\n")
    return path


def load_eval_prompts(path: str | Path | None = None) -> list[dict]:
    """Rows {idx, category, prompt} of the shipped eval set (or of ``path``)."""
    path = Path(path) if path is not None else EVAL_PATH
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; regenerate it with `python -m data.shapes`")
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    print(f"wrote {write_eval_prompts()}")
