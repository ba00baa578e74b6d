"""The SJD2 training noise layout (DESIGN.md 5.3): which input positions get which noise level.

Training mirrors one inference window. At inference the model sees a clean prefix (the prompt, the
committed tokens, then clean Jacobi drafts) followed by noisy slots whose noise levels increase along
the window; the output at every slot is the distribution of the *next clean token*. So per training
sequence we

1. keep a share ``clean_share`` of sequences entirely clean (plain next-token prediction keeps AR quality);
2. otherwise choose a random contiguous span of image-code positions (``span_min``..``span_max`` codes),
3. split it into 1..``segments_max`` contiguous segments and give each segment a noise level drawn
   uniformly from ``1..n_levels``, sorted so that levels never decrease along the sequence.

Level 0 means clean; level ``k >= 1`` is the k-th entry of the noise schedule (``models.noisy``).

Decisions the paper leaves open (all documented in ``conf/train/*.yaml``):

* **Forced tokens are never noised.** Head tokens, end-of-line tokens and tail tokens are fixed by the
  layout; the SJD2 decoder feeds them clean, so training feeds them clean too (level 0), also when they
  sit inside the noisy span. The span is counted in image codes, and EOL columns inside it stay clean.
* **Labels are unchanged**: the label of position ``i`` is the clean token ``i + 1`` whatever the noise.
* **Loss positions** (``loss_on``): ``codes`` (default; as Emu3's fine-tuning and DESIGN "loss on image
  positions only") counts only targets that are free image codes, since the decoder forces head, EOL and
  tail tokens itself; ``image`` counts every target of the image sequence (head, EOL, tail included, as
  Lumina-mGPT's fine-tuning). Prompt and padding targets are always ``IGNORE``.
* **Loss after the span** (``loss_after_span``, default on): positions after a row's last noisy input see a
  noisy history that decoding never produces; ``false`` drops their loss (the slots keep theirs).
* **Prompt dropout** (``prompt_dropout``): the prompt of a sequence is replaced by the adapter's
  unconditional context (the exact ids its CFG row attends to), so CFG keeps working.

Everything random here is drawn from a per-example ``numpy`` generator seeded by (seed, epoch, example
index), so a batch does not depend on the world size, the rank or on what ran before (exact resume).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.base import FREE, ImageLayout

IGNORE = -100  # label of positions without loss (torch cross_entropy's ignore_index)
LOSS_ON = ("codes", "image")


@dataclass(frozen=True)
class NoiseLayoutConfig:
    """How training sequences are noised (YAML: ``train.layout``)."""

    clean_share: float = 0.1  # share of sequences left entirely clean
    span_min: int = 1  # fewest image codes in the noisy span
    span_max: int = 96  # most image codes in the noisy span (the inference window; clipped to the image)
    segments_max: int = 8  # the span is split into 1..segments_max segments, one noise level each
    prompt_dropout: float = 0.1  # share of sequences whose prompt is replaced by the unconditional one
    loss_on: str = "codes"  # "codes": targets that are free image codes; "image": the whole image sequence
    loss_after_span: bool = True  # False: no loss at the clean positions after a row's noisy span (their history
    #                               is noisy, which decoding never feeds: levels never decrease along a window)

    def __post_init__(self) -> None:
        if not 0.0 <= self.clean_share <= 1.0:
            raise ValueError(f"clean_share must lie in [0, 1], got {self.clean_share}")
        if not 0.0 <= self.prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout must lie in [0, 1], got {self.prompt_dropout}")
        if not 1 <= self.span_min <= self.span_max:
            raise ValueError(f"need 1 <= span_min <= span_max, got {self.span_min}, {self.span_max}")
        if self.segments_max < 1:
            raise ValueError(f"segments_max must be >= 1, got {self.segments_max}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")


@dataclass
class Batch:
    """One micro-batch. Rows are left-padded so the image sequence starts at column ``image_start``."""

    input_ids: torch.Tensor  # [B, T] clean token ids
    attention_mask: torch.Tensor  # [B, T] 1 = token, 0 = padding
    labels: torch.Tensor  # [B, T] the clean next token, IGNORE where there is no loss
    levels: torch.Tensor  # [B, T] noise level of each input (0 = clean)
    noise_seeds: torch.Tensor  # [B] seed of each row's Gaussian noise
    image_start: int  # column of the first image-sequence token

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
            self.levels.to(device), self.noise_seeds, self.image_start,
        )


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of everything random about example ``index`` in ``epoch``."""
    return np.random.default_rng([seed, epoch, index])


def sample_levels(n_codes: int, cfg: NoiseLayoutConfig, n_levels: int, rng: np.random.Generator) -> np.ndarray:
    """Noise level per image code of one sequence: int64 [n_codes], 0 = clean.

    Clean with probability ``clean_share``; otherwise a contiguous span split into sorted-level segments.
    """
    levels = np.zeros(n_codes, dtype=np.int64)
    if n_codes == 0 or n_levels < 1 or rng.random() < cfg.clean_share:
        return levels
    span = int(rng.integers(min(cfg.span_min, n_codes), min(cfg.span_max, n_codes) + 1))
    start = int(rng.integers(0, n_codes - span + 1))
    n_seg = int(rng.integers(1, min(cfg.segments_max, span) + 1))
    cuts = np.sort(rng.choice(np.arange(1, span), size=n_seg - 1, replace=False)) if n_seg > 1 else []
    bounds = [0, *[int(c) for c in cuts], span]
    seg_levels = np.sort(rng.integers(1, n_levels + 1, size=n_seg))  # non-decreasing along the span
    for lo, hi, lvl in zip(bounds[:-1], bounds[1:], seg_levels):
        levels[start + lo : start + hi] = lvl
    return levels


def image_targets(layout: ImageLayout, loss_on: str) -> torch.Tensor:
    """Bool [n_tokens]: which image-sequence tokens count as loss targets."""
    free = layout.forced_ids(torch.arange(layout.n_tokens)) == FREE
    return free if loss_on == "codes" else torch.ones_like(free)


def make_batch(
    records: Sequence[tuple[Sequence[int], int]],
    keys: Sequence[tuple[int, int]],
    layout: ImageLayout,
    uncond_ids: Sequence[int],
    pad_id: int,
    cfg: NoiseLayoutConfig,
    n_levels: int,
    seed: int,
) -> Batch:
    """Collate ``(input_ids, prompt_len)`` records into a noised :class:`Batch`.

    ``keys[i] = (epoch, example index)`` seeds row i (prompt dropout, noise layout, Gaussian noise).
    ``uncond_ids``: the unconditional context that replaces a dropped prompt.
    """
    n_img = layout.n_tokens
    rngs = [example_rng(seed, e, i) for e, i in keys]
    prompts, images = [], []
    for (ids, p_len), rng in zip(records, rngs):
        ids = list(ids)
        if len(ids) - int(p_len) != n_img:
            raise ValueError(
                f"a record holds {len(ids) - int(p_len)} image-sequence tokens, the model's layout needs {n_img} "
                f"({layout.height}x{layout.width} codes); re-tokenise the data for this model/resolution"
            )
        drop = rng.random() < cfg.prompt_dropout
        prompts.append(list(uncond_ids) if drop else ids[: int(p_len)])
        images.append(ids[int(p_len) :])
    p_max = max(len(p) for p in prompts)
    b, t = len(records), p_max + n_img
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    for r, (p, img) in enumerate(zip(prompts, images)):
        input_ids[r, p_max - len(p) :] = torch.tensor(p + img, dtype=torch.long)
        attention_mask[r, p_max - len(p) :] = 1
    labels = torch.full((b, t), IGNORE, dtype=torch.long)
    targets = image_targets(layout, cfg.loss_on)  # [n_img], target j is image token j
    img_ids = input_ids[:, p_max:]  # [B, n_img]
    # position i predicts token i+1: image token j is the target of position p_max + j - 1
    labels[:, p_max - 1 : t - 1] = torch.where(targets, img_ids, torch.full_like(img_ids, IGNORE))
    levels = torch.zeros((b, t), dtype=torch.long)
    free = (layout.forced_ids(torch.arange(n_img)) == FREE).nonzero().flatten() + p_max  # code columns
    for r, rng in enumerate(rngs):
        levels[r, free] = torch.from_numpy(sample_levels(len(free), cfg, n_levels, rng))
    if not cfg.loss_after_span:
        for r in range(b):
            noisy_cols = (levels[r] > 0).nonzero().flatten()
            if noisy_cols.numel():
                labels[r, int(noisy_cols[-1]) + 1 :] = IGNORE
    noise_seeds = torch.tensor([int(rng.integers(0, 2**62)) for rng in rngs], dtype=torch.long)
    return Batch(input_ids, attention_mask, labels, levels, noise_seeds, p_max)


def unconditional_ids(adapter) -> list[int]:
    """The ids the adapter's unconditional CFG row attends to (tiny: ``<bos>``; Emu3: the negative prompt)."""
    pre = adapter.prompt("", cfg=True)
    row, mask = pre.input_ids[1], pre.attention_mask[1]
    return row[mask.bool()].tolist()
