"""Checkpoint folders laid out as the published ones, with random weights, at any size.

The real-size check (:mod:`bench.real_size`) writes them at 7B / 8B; the loading tests write the same
layout at tiny widths, so every loading path a user's download takes is exercised here without a download.
Where each name and value comes from (public code read with the project's tools; the Hugging Face hub
itself is out of reach, so what only the hub shows is inferred and said so):

**Lumina-mGPT-7B-768** (``Alpha-VLLM/Lumina-mGPT-7B-768``)
* weights: ``lumina_mgpt/finetune_solver.py`` deletes ``model.vqmodel`` and ``xllmx/util/ckpt.py`` saves
  with ``save_pretrained`` (transformers 4.4x: bf16 safetensors shards of at most 5 GB each,
  ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``; the shard size is transformers'
  default, inferred). Key names are those of ``lumina_mgpt/model/chameleon/modeling_chameleon.py``
  (``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``...mlp.{gate,up,down}_proj``,
  ``...{input,post_attention}_layernorm``, ``model.norm``, ``lm_head``); its ``ChameleonLayerNorm`` keeps
  q/k-norm weight *and bias* as ``[model_parallel_size, head_dim]`` = ``[1, 128]`` at 7B
  (``convert_chameleon_weights_to_hf.py``: ``.reshape(1, -1)``).
* config: ``ChameleonXLLMXConfig`` (``configuration_xllmx_chameleon.py``: ``z_loss_weight``) over
  Chameleon-7B's values (``convert_chameleon_weights_to_hf.py``: hidden 4096, 32 layers, 32 heads, MHA,
  FFN 11008, rope 10000, ``vq_config`` = Meta's vqgan.yaml params with renamed copies, the full
  ``vocabulary_map``), ``max_position_embeddings`` 4096 (``exps/7B.sh --max_seq_len 4096``, passed to
  ``from_pretrained`` by the finetune solver), dropout 0.05, z-loss 1e-5, image logits unmasked.
* tokenizer: ``LlamaTokenizerFast.save_pretrained`` of Meta's ``text_tokenizer.json`` with
  ``<reserved08707>`` renamed ``<image>`` (the conversion script): ``tokenizer.json`` +
  ``tokenizer_config.json`` (``tokenizer_class: LlamaTokenizer``) + ``special_tokens_map.json``. Ours is a
  byte-level BPE of 65,536 ids with the real special, reserved and image-code names at their real ids.
* image codec: Meta's ``tokenizer/vqgan.yaml`` + ``vqgan.ckpt`` (a Lightning checkpoint whose
  ``state_dict`` also holds ``loss.*``), names as :mod:`models.chameleon_vqgan` documents.

**Emu3-Gen** (``BAAI/Emu3-Gen-hf``, converted by transformers 4.48)
* weights: transformers 5.x renames ``^text_model.lm_head`` -> ``lm_head``, ``^text_model`` ->
  ``model.text_model`` (``.model`` dropped by ``Emu3Model``'s rule) and ``^vqmodel`` -> ``model.vqmodel``
  on load (``transformers/conversion_mapping.py``, entry ``emu3``), so the hub files carry
  ``text_model.model.*``, ``text_model.lm_head.weight`` and ``vqmodel.*``; bf16, 5 GB shards.
* config: ``Emu3Config`` with ``text_config`` (transformers' ``Emu3TextConfig`` defaults: hidden 4096,
  32 layers, 32 heads, 8 KV heads, FFN 14336, 9216 positions, rope 1e6 written as the 4.x
  ``rope_theta`` + ``rope_scaling``), ``vq_config`` (``Emu3VQVAEConfig`` defaults) and the full
  ``vocabulary_map``.
* tokenizer: ``convert_emu3_weights_to_hf.py``'s ``convert_tiktoken``: byte-level BPE ``tokenizer.json``,
  ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` (``GPT2Tokenizer``), ``special_tokens_map.json``;
  ``preprocessor_config.json`` of ``Emu3ImageProcessor`` (mean/std 0.5).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default (4.4x)
INIT_STD = 0.02  # initializer_range of both configs


@dataclass(frozen=True)
class LmSizes:
    """The language model's shape (the published values are the defaults of each family's constant)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


LUMINA_7B = LmSizes(4096, 11008, 32, 32, 32, 4096)
EMU3_8B = LmSizes(4096, 14336, 32, 32, 8, 9216)


def tiny(sizes: LmSizes, layers: int = 2, hidden: int = 32, heads: int = 2) -> LmSizes:
    """The same family shape at test widths (KV heads shrunk in proportion, at least one)."""
    kv = max(1, heads * sizes.num_key_value_heads // sizes.num_attention_heads)
    return replace(sizes, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=kv)


# ---------------------------------------------------------------------------------------------------
# Tensors, streamed into shards


TensorSpec = tuple[str, tuple[int, ...], str]  # (key, shape, init: "normal" | "ones" | "zeros")


def lm_layer_specs(prefix: str, s: LmSizes, qk_norm_rows: int | None) -> Iterator[TensorSpec]:
    """One decoder layer's tensors in ``state_dict`` order (Llama / Chameleon naming)."""
    d, hd, kv = s.hidden_size, s.head_dim, s.num_key_value_heads * s.head_dim
    yield f"{prefix}.self_attn.q_proj.weight", (d, d), "normal"
    yield f"{prefix}.self_attn.k_proj.weight", (kv, d), "normal"
    yield f"{prefix}.self_attn.v_proj.weight", (kv, d), "normal"
    yield f"{prefix}.self_attn.o_proj.weight", (d, d), "normal"
    if qk_norm_rows is not None:
        for which in ("q_norm", "k_norm"):
            yield f"{prefix}.self_attn.{which}.weight", (qk_norm_rows, hd), "ones"
            yield f"{prefix}.self_attn.{which}.bias", (qk_norm_rows, hd), "zeros"
    yield f"{prefix}.mlp.gate_proj.weight", (s.intermediate_size, d), "normal"
    yield f"{prefix}.mlp.up_proj.weight", (s.intermediate_size, d), "normal"
    yield f"{prefix}.mlp.down_proj.weight", (d, s.intermediate_size), "normal"
    yield f"{prefix}.input_layernorm.weight", (d,), "ones"
    yield f"{prefix}.post_attention_layernorm.weight", (d,), "ones"


def lm_specs(base: str, head: str, s: LmSizes, vocab: int, qk_norm_rows: int | None) -> Iterator[TensorSpec]:
    """Embedding, layers, final norm, LM head: the order ``save_pretrained`` shards them in."""
    yield f"{base}.embed_tokens.weight", (vocab, s.hidden_size), "normal"
    for i in range(s.num_hidden_layers):
        yield from lm_layer_specs(f"{base}.layers.{i}", s, qk_norm_rows)
    yield f"{base}.norm.weight", (s.hidden_size,), "ones"
    yield head, (vocab, s.hidden_size), "normal"


def make_tensor(shape: tuple[int, ...], init: str, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A random (or constant) tensor drawn in row blocks (no float32 copy of a whole embedding)."""
    if init == "ones":
        return torch.ones(shape, dtype=dtype)
    if init == "zeros":
        return torch.zeros(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    rows = max(1, (1 << 24) // max(1, math.prod(shape[1:])))
    for lo in range(0, shape[0], rows):
        block = out[lo : lo + rows]
        block.copy_(torch.randn(block.shape, generator=gen) * INIT_STD)
    return out


def write_shards(out_dir: Path, tensors: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int,
                 dtype_name: str = "bfloat16") -> dict:
    """``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` as ``save_pretrained``
    writes them, holding at most one shard in memory; a single shard is ``model.safetensors``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    names: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            save_file(shard, str(out_dir / f"part-{len(names):05d}.tmp"), metadata={"format": "pt"})
            names.append(list(shard))
            shard, size = {}, 0

    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[key], size, total = t.contiguous(), size + nbytes, total + nbytes
    flush()
    n = len(names)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, name in enumerate(files):
        (out_dir / f"part-{i:05d}.tmp").replace(out_dir / name)
        (out_dir / name).chmod(0o644)
    index = {"metadata": {"total_size": total}, "weight_map": {k: files[i] for i, keys in enumerate(names) for k in keys}}
    if n > 1:
        write_json(out_dir / "model.safetensors.index.json", index)
    return index


def random_tensors(specs: Iterator[TensorSpec], seed: int, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    for key, shape, init in specs:
        yield key, make_tensor(shape, init, gen, dtype)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------
# Byte-level BPE tokenizer files


def byte_table() -> dict[int, str]:
    """GPT-2's byte-level stand-ins: printable Latin-1 bytes map to themselves, the other 68 bytes to
    U+0100 onwards in byte order (the map the ``ByteLevel`` pre-tokenizer applies)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of the byte-level pre-tokenizer, in byte order."""
    table = byte_table()
    return [table[b] for b in range(256)]


def word_merges(words: list[str]) -> tuple[list[str], list[str]]:
    """(new tokens, merges) that spell each byte-level word left to right (``ab`` + ``c`` -> ``abc``)."""
    table = byte_table()
    tokens: list[str] = []
    merges: list[str] = []
    seen: set[str] = set(table.values())
    for word in words:
        chars = "".join(table[b] for b in word.encode())
        for k in range(2, len(chars) + 1):
            if chars[:k] not in seen:
                seen.add(chars[:k])
                tokens.append(chars[:k])
                merges.append(f"{chars[: k - 1]} {chars[k - 1]}")
    return tokens, merges


TEMPLATE_WORDS = ["Generate", " an", " image", " of", " according", " to", " the", " following", " prompt",
                  " a", " red", " blue", " green", " circle", " square", " triangle", " left", " right", " cat",
                  " dog", " photo", " on", " in", " with", " and", " masterpiece", " film", " grained", " best",
                  " quality"]


def tokenizer_json(vocab: Mapping[str, int], merges: list[str], specials: Mapping[str, int]) -> dict:
    """A ``tokenizers`` JSON: byte-level BPE (GPT-2 pre-tokenizer and decoder), ``specials`` as added tokens."""
    added = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for c, i in sorted(specials.items(), key=lambda kv: kv[1])]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": dict(vocab), "merges": merges},
    }


def build_vocab(fixed: Mapping[int, str], vocab_size: int, text_base: int,
                filler: Callable[[int], str]) -> tuple[dict[str, int], list[str]]:
    """name -> id: ``fixed`` (the family's real names at their real ids), 256 byte tokens and the template
    words' merge tokens from ``text_base`` on, every other id a ``filler(id)`` name. Returns (vocab, merges)."""
    table = dict(fixed)
    words, merges = word_merges(TEMPLATE_WORDS)
    for i, name in enumerate(byte_alphabet() + words):
        if text_base + i in table:
            raise ValueError(f"text token id {text_base + i} collides with {table[text_base + i]!r}")
        table[text_base + i] = name
    for i in range(vocab_size):
        table.setdefault(i, filler(i))
    vocab = {name: i for i, name in table.items()}
    if len(vocab) != vocab_size:
        raise ValueError("duplicate token names in the synthetic vocabulary")
    return vocab, merges


__all__ = ["EMU3_8B", "LUMINA_7B", "LmSizes", "build_vocab", "lm_specs", "random_tensors", "tiny",
           "tokenizer_json", "write_json", "write_shards"]
