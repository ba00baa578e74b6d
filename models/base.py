"""The model-adapter protocol (DESIGN.md section 3).

Decoders and the trainer talk to a model only through an adapter. Caches and attention masks are
values passed to and returned from the adapter, never attributes set on it.

Conventions
-----------
* The *image sequence* is every token the decoder generates after the prompt: head tokens
  (e.g. ``<img_start>``, height, width), ``height`` rows of ``width`` image codes each followed by an
  end-of-line token, then tail tokens (end of image, EOS). Generated-token index ``j`` counts from 0
  at the first head token. AR decoding spends exactly ``layout.n_tokens`` forwards (prefill included).
* With classifier-free guidance the batch holds two streams: row 0 conditional, row 1 unconditional.
  Both share one cache and are cropped together.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from models.noisy import Sjd2Recipe

FREE = -1  # forced_ids() value of a position where any image code may be sampled


@dataclass(frozen=True)
class ImageLayout:
    """Where each generated token must be an image code and where it is forced.

    ``code_start``/``code_stop`` delimit the contiguous vocabulary range of image codes
    (which vocab id maps to which codebook entry is the adapter's business).
    """

    height: int  # rows of image codes
    width: int  # image codes per row
    head: tuple[int, ...]  # forced ids before the first row
    eol: int | None  # end-of-line id after every row (None: no EOL column)
    tail: tuple[int, ...]  # forced ids after the last row
    code_start: int
    code_stop: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"impossible image size: {self.height}x{self.width} codes (need >= 1x1)")
        if self.code_stop <= self.code_start:
            raise ValueError(f"empty image-code range [{self.code_start}, {self.code_stop})")

    @property
    def n_codes(self) -> int:
        return self.code_stop - self.code_start

    @property
    def row_len(self) -> int:
        return self.width + (self.eol is not None)

    @property
    def n_tokens(self) -> int:
        """Tokens in the image sequence == forwards of plain AR decoding."""
        return len(self.head) + self.height * self.row_len + len(self.tail)

    def forced_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """Forced token id per generated-token index, ``FREE`` where an image code is sampled.

        positions: LongTensor of any shape with values in [0, n_tokens).
        """
        pos = torch.as_tensor(positions, dtype=torch.long)
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= self.n_tokens):
            raise IndexError(f"position outside the image sequence [0, {self.n_tokens})")
        out = torch.full_like(pos, FREE)
        n_head, body = len(self.head), self.height * self.row_len
        if n_head:
            head = torch.tensor(self.head, dtype=torch.long, device=pos.device)
            in_head = pos < n_head
            out[in_head] = head[pos[in_head]]
        q = pos - n_head
        if self.eol is not None:
            out[(q >= 0) & (q < body) & (q % self.row_len == self.width)] = self.eol
        if self.tail:
            tail = torch.tensor(self.tail, dtype=torch.long, device=pos.device)
            in_tail = q >= body
            out[in_tail] = tail[q[in_tail] - body]
        return out

    def code_mask(self, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool [V]: True on image-code ids."""
        mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        mask[self.code_start : self.code_stop] = True
        return mask

    def code_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full image sequence [n_tokens] -> vocab ids of the image codes [height, width]."""
        tokens = torch.as_tensor(tokens).reshape(-1)
        if tokens.numel() != self.n_tokens:
            raise ValueError(f"expected {self.n_tokens} image-sequence tokens, got {tokens.numel()}")
        body = tokens[len(self.head) : len(self.head) + self.height * self.row_len]
        return body.view(self.height, self.row_len)[:, : self.width]

    def sequence(self, grid: torch.Tensor) -> torch.Tensor:
        """Vocab ids of the image codes [height, width] -> full image sequence [n_tokens]."""
        grid = torch.as_tensor(grid, dtype=torch.long)
        if tuple(grid.shape) != (self.height, self.width):
            raise ValueError(f"expected a {self.height}x{self.width} code grid, got {tuple(grid.shape)}")
        rows = grid
        if self.eol is not None:
            rows = torch.cat([grid, torch.full((self.height, 1), self.eol, dtype=torch.long)], dim=1)
        return torch.cat(
            [torch.tensor(self.head, dtype=torch.long), rows.reshape(-1), torch.tensor(self.tail, dtype=torch.long)]
        )

    def violations(self, tokens: torch.Tensor) -> list[int]:
        """Indices where a full image sequence breaks the layout (empty list: it respects it)."""
        tokens = torch.as_tensor(tokens).reshape(-1).cpu()
        if tokens.numel() != self.n_tokens:
            return [min(tokens.numel(), self.n_tokens)]
        forced = self.forced_ids(torch.arange(self.n_tokens))
        free = forced == FREE
        is_code = (tokens >= self.code_start) & (tokens < self.code_stop)
        bad = (free & ~is_code) | (~free & (tokens != forced))
        return bad.nonzero().flatten().tolist()


@dataclass
class Prefill:
    """The prompt as the model sees it: row 0 conditional, row 1 (with CFG) unconditional."""

    input_ids: torch.Tensor  # [B, T] left-padded
    attention_mask: torch.Tensor  # [B, T] 1 = attend, 0 = padding / masked-out prompt


@runtime_checkable
class ModelAdapter(Protocol):
    """What decoders and the trainer may use of a model (DESIGN.md section 3)."""

    name: str
    layout: ImageLayout
    vocab_size: int
    device: torch.device

    image_size: int  # pixels per side of the generated image

    def prompt_ids(self, text: str) -> list[int]:
        """The conditional prompt's ids as training sequences start (labels go on what follows)."""

    def prompt(self, text: str, cfg: bool = True) -> Prefill:
        """Token ids + attention mask of the prompt (2 rows with CFG: conditional, unconditional)."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, D] input embeddings (model dtype)."""

    def forward(
        self, inputs_embeds: torch.Tensor, cache: Any, attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Append a window of any length to ``cache`` (None: a new one).

        inputs_embeds: [B, L, D]; attention_mask: [B, cached + L], or [B, L, cached + L] (bool: which
        entries each input attends, e.g. the ancestors in a draft tree; needs ``position_ids``);
        position_ids: [B, L] (None: the column index, as batch 1 always had; batched decoding passes the
        attended count, see :mod:`decode.batch`). Returns float32 logits [B, L, V] and the grown cache.
        """

    def rollback(self, cache: Any, n: int) -> Any:
        """Drop the last ``n`` cache entries of every stream; returns the cache."""

    def keep_tail(self, cache: Any, n: int, keep: torch.Tensor) -> Any:
        """Of the last ``n`` entries of every stream keep those at ``keep`` (increasing indices in [0, n)),
        moved in order to the front of that span, and drop the rest (a draft tree's accepted path)."""

    def gather_cache(self, cache: Any, rows: torch.Tensor, cols: torch.Tensor) -> Any:
        """A cache whose stream i holds, in order, the entries ``cols[i]`` [T'] of old stream ``rows[i]``
        (batched decoding's compaction); returns the new cache."""

    def decode_image(self, tokens: torch.Tensor) -> Any:
        """Full image sequence [n_tokens] -> PIL.Image through the model's image decoder."""

    def encode_image(self, image: Any) -> torch.Tensor:
        """PIL.Image -> full image sequence [n_tokens] (for training data)."""

    def embedding_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [D], std [D]) over the image-code rows of the input embedding (float32, frozen)."""

    @property
    def reserved_ids(self) -> tuple[int, ...]:
        """Vocabulary ids the model never uses, available as SJD2 timestep (noise-level) tokens."""

    def export(self, lm_state: dict[str, torch.Tensor], out_dir: Path, recipe: Sjd2Recipe | None) -> None:
        """Write the trained LM weights ``lm_state`` to ``out_dir`` in the model's own format (the trainer
        writes ``sjd2.json`` beside them; ``recipe`` is for formats that also keep it inside)."""

    def trained_recipe(self) -> Sjd2Recipe | None:
        """The SJD2 fine-tuning this checkpoint went through (noise, frozen norm, timestep MLP); None for
        a model that was not fine-tuned for SJD2. The one place decoders learn it from."""


class HFAdapter:
    """Shared plumbing for adapters over a ``transformers`` causal LM.

    Subclasses set ``name``, ``layout``, ``model`` (the full LM), ``backbone`` (the module that takes
    ``inputs_embeds`` + ``past_key_values`` and returns hidden states) and ``lm_head``, and implement
    ``prompt``, ``decode_image``, ``encode_image`` and ``reserved_ids``.
    """

    name: str
    layout: ImageLayout
    model: torch.nn.Module
    backbone: torch.nn.Module
    lm_head: torch.nn.Module
    sjd2_recipe: dict | None = None  # sjd2.json as exported (attach_sjd2_extras); read by trained_recipe()
    timestep_mlp: torch.nn.Module | None = None  # timestep_mlp.safetensors (attach_sjd2_extras)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device  # (not next(model.parameters()): decoders ask every forward)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.backbone.get_input_embeddings()
        return table(ids.to(table.weight.device))

    @torch.no_grad()
    def forward(
        self, inputs_embeds: torch.Tensor, cache: Any, attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=self.model.config)
        extra = {} if position_ids is None else {"position_ids": position_ids.to(self.device)}
        mask = attention_mask.to(self.device)
        if mask.dim() == 3:  # per-input mask [B, L, T] (a draft tree): the additive 4D mask transformers takes as is
            blocked = torch.zeros(mask.shape, dtype=self.dtype, device=self.device)
            mask = blocked.masked_fill_(~mask.bool(), torch.finfo(self.dtype).min)[:, None]
        out = self.backbone(
            inputs_embeds=inputs_embeds.to(self.dtype),
            past_key_values=cache,
            attention_mask=mask,
            use_cache=True,
            **extra,
        )
        logits = self.lm_head(out.last_hidden_state).float()  # [B, L, V]
        return logits, out.past_key_values

    def rollback(self, cache: Any, n: int) -> Any:
        if n < 0:
            raise ValueError(f"rollback needs n >= 0, got {n}")
        if n:
            cache.crop(-n)  # transformers 5.x: a negative argument removes that many entries
        return cache

    def keep_tail(self, cache: Any, n: int, keep: torch.Tensor) -> Any:
        n_keep = int(keep.numel())
        if n_keep < n:
            for layer in cache.layers:  # DynamicLayer keys / values [B, H, T, Dh]: copy the kept entries in place
                start = layer.keys.shape[-2] - n
                src = start + keep.to(layer.keys.device)
                for name in ("keys", "values"):
                    x = getattr(layer, name)
                    x[..., start : start + n_keep, :] = x[..., src, :]
        return self.rollback(cache, n - n_keep)

    def gather_cache(self, cache: Any, rows: torch.Tensor, cols: torch.Tensor) -> Any:
        for layer in cache.layers:  # transformers 5.x DynamicLayer: keys / values [B, H, T, Dh]
            index = cols.to(layer.keys.device)[:, None, :, None]
            for name in ("keys", "values"):
                old = getattr(layer, name)[rows.to(layer.keys.device)]
                setattr(layer, name, torch.gather(old, 2, index.expand(-1, old.shape[1], -1, old.shape[3])))
        return cache

    def _need_vq(self, missing: str) -> Any:
        """``self.vq``, the image codec kept beside the LM (tiny's patch VQ, Lumina's VQGAN); a checkpoint
        may come without one, and then ``missing`` (what to do about it) is the RuntimeError."""
        vq = getattr(self, "vq", None)
        if vq is None:
            raise RuntimeError(missing)
        return vq

    def embedding_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.backbone.get_input_embeddings().weight
        with gathered(weight):  # under ZeRO-3 the table is partitioned outside a forward
            rows = weight.detach()[self.layout.code_start : self.layout.code_stop].float()  # [N_codes, D]: no
        return rows.mean(0), rows.std(0).clamp_min(1e-6)  # float32 copy of the whole [V, D] table

    def trained_recipe(self) -> Sjd2Recipe | None:
        raw = self._recipe_json()
        return None if raw is None else Sjd2Recipe.from_json(raw, self.timestep_mlp)

    def _recipe_json(self) -> dict | None:
        """Where this format keeps the recipe's JSON (HF checkpoints: ``sjd2.json`` beside the weights)."""
        return self.sjd2_recipe

    def export(self, lm_state: dict[str, torch.Tensor], out_dir: Path, recipe: Sjd2Recipe | None) -> None:
        """``save_pretrained`` with the trained weights, plus the tokenizer / processor (the recipe goes to
        ``sjd2.json``, written by the trainer)."""
        self.model.save_pretrained(str(out_dir), state_dict=lm_state)
        for attr in ("tokenizer", "processor"):
            tok = getattr(self, attr, None)
            if tok is not None and hasattr(tok, "save_pretrained"):
                tok.save_pretrained(str(out_dir))


def gathered(*params: torch.nn.Parameter) -> Any:
    """A context in which DeepSpeed ZeRO-3-partitioned ``params`` hold their full values (read-only); a
    no-op for ordinary parameters. Every rank must enter it (the gather is collective)."""
    import contextlib

    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def left_pad(rows: list[list[int]], pad_id: int) -> Prefill:
    """Left-pad token rows into a :class:`Prefill` (padding gets attention mask 0)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return Prefill(ids, mask)


def attach_sjd2_extras(adapter: Any, ckpt: Path) -> Any:
    """What the SJD2 trainer exports beside the weights (``train.export.export_weights``): ``sjd2.json``
    -> ``adapter.sjd2_recipe`` (its JSON), ``timestep_mlp.safetensors`` -> ``adapter.timestep_mlp`` (a
    :class:`models.noisy.TimestepMLP`); absent files leave ``None``. Read through the typed
    ``adapter.trained_recipe()``."""
    adapter.sjd2_recipe, adapter.timestep_mlp = None, None
    ckpt = Path(ckpt)
    if (ckpt / "sjd2.json").is_file():
        adapter.sjd2_recipe = json.loads((ckpt / "sjd2.json").read_text())
    mlp_file = ckpt / "timestep_mlp.safetensors"
    if mlp_file.is_file():
        from safetensors.torch import load_file

        from models.noisy import TimestepMLP

        state = load_file(str(mlp_file))
        width, freq_dim = state["net.0.weight"].shape
        mlp = TimestepMLP(int(state["net.2.weight"].shape[0]), freq_dim=int(freq_dim), width=int(width))
        mlp.load_state_dict(state)
        adapter.timestep_mlp = mlp.to(adapter.device).eval()
    return adapter
