"""Pieces both Hugging Face adapters (Lumina-mGPT, Emu3) use: configs from mappings, checkpoint lookup,
the name-based code map and the adapter set-up over it, the sizes and byte-level tokenizers of tiny
random configs, dtype names."""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from models.base import HFAdapter


def config_from_mapping(cls: type, cfg: Mapping[str, Any]) -> Any:
    """A frozen config dataclass from a YAML mapping (DictConfig or dict); unknown keys are an error."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    cfg = dict(cfg)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in model config {cfg.get('name')!r}; allowed: {sorted(known)}")
    return cls(**cfg)


@dataclass(frozen=True)
class RandomSizes:
    """Language-model sizes of a randomly initialised tiny HF model (same classes, real vocabulary ids and
    layout); each family subclasses it to add its image codec's widths."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    max_position_embeddings: int = 4096
    num_key_value_heads: int | None = None  # None: multi-head attention (as many as num_attention_heads)

    def text_config(self, vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> dict:
        """The transformers text-config keys these sizes fix (KV heads: ``num_key_value_heads`` or MHA)."""
        return {
            "vocab_size": vocab_size, "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads or self.num_attention_heads, "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
        }


@dataclass(frozen=True)
class HFModelConfig:
    """The ``conf/model/*.yaml`` keys every Hugging Face family has (keys 1:1). A family subclasses it with
    its defaults for the first four keys, its own keys and its ``sizes_class``."""

    sizes_class: ClassVar[type[RandomSizes]] = RandomSizes

    family: str
    name: str
    path: str | None  # hub id (cached) or local folder
    image_size: int  # pixels, square
    device: str = "cpu"
    dtype: str = "bfloat16"
    local_files_only: bool = True  # never download unless false
    random_init: bool = False  # true: tiny random model + tokenizer built in code (tests)
    seed: int = 0  # random_init only
    random_sizes: RandomSizes | None = None  # random_init only
    sampling_defaults: dict = field(default_factory=dict)  # the paper's sampling settings (informative)

    def __post_init__(self) -> None:
        """A YAML ``random_sizes`` mapping becomes ``sizes_class``; ``random_init`` without sizes gets its defaults."""
        if isinstance(self.random_sizes, Mapping):
            object.__setattr__(self, "random_sizes", self.sizes_class(**self.random_sizes))
        if self.random_init and self.random_sizes is None:
            object.__setattr__(self, "random_sizes", self.sizes_class())


def vocab_id(vocab: Mapping[str, int], name: str, tokenizer_kind: str) -> int:
    """The id of token ``name``; a tokenizer without it is not of the family (``tokenizer_kind``: "an Emu3")."""
    if name not in vocab:
        raise KeyError(f"token {name!r} is missing from the vocabulary: is this {tokenizer_kind} tokenizer?")
    return int(vocab[name])


def resolve_checkpoint(path: str | None, local_files_only: bool, hint: str) -> Path:
    """A local checkpoint folder for ``path`` (a folder, or a hub id already in the HF cache).

    Never downloads unless ``local_files_only`` is False.
    """
    if not path:
        raise FileNotFoundError(f"model.path is empty; {hint}")
    from models import resolve_path

    local = resolve_path(path)
    if local.is_dir():
        return local
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not Path(str(path)).expanduser().exists():
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=str(path), local_files_only=local_files_only))
        except Exception as err:  # not cached (offline) or not downloadable
            raise FileNotFoundError(
                f"checkpoint {path!r} is neither a local folder nor in the Hugging Face cache "
                f"({type(err).__name__}); {hint}"
            ) from err
    raise FileNotFoundError(f"checkpoint folder {local} does not exist; {hint}")


def read_checkpoint_config(ckpt: Path, model_type: str, hint: str) -> dict:
    """``config.json`` of a checkpoint folder, refusing another ``model_type``."""
    cfg_file = ckpt / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} does not exist (not a transformers checkpoint folder); {hint}")
    raw = json.loads(cfg_file.read_text())
    if raw.get("model_type") != model_type:
        raise ValueError(
            f"{ckpt} holds a {raw.get('model_type')!r} checkpoint (architectures {raw.get('architectures')}), "
            f"but this adapter needs model_type {model_type!r}; {hint}"
        )
    return raw


@dataclass(frozen=True)
class CodeMap:
    """VQ code <-> vocabulary id, built from the vocabulary names."""

    bpe_of_code: torch.Tensor  # [n_codes] long: vocab id of code c
    code_of_bpe: torch.Tensor  # [V] long: code of vocab id, -1 for non-image ids

    @classmethod
    def from_vocab(cls, vocab: Mapping[str, int], parse: Callable[[str], int | None], vocab_size: int) -> CodeMap:
        pairs = {}
        for name, idx in vocab.items():
            code = parse(name)
            if code is not None:
                pairs[code] = int(idx)
        n = len(pairs)
        if n == 0 or sorted(pairs) != list(range(n)):
            raise ValueError(f"the vocabulary's image-code names do not spell codes 0..N-1 ({n} found)")
        bpe_of_code = torch.tensor([pairs[c] for c in range(n)], dtype=torch.long)
        code_of_bpe = torch.full((vocab_size,), -1, dtype=torch.long)
        code_of_bpe[bpe_of_code] = torch.arange(n)
        return cls(bpe_of_code, code_of_bpe)

    @property
    def n_codes(self) -> int:
        return int(self.bpe_of_code.numel())

    def id_range(self) -> tuple[int, int]:
        """``[start, stop)`` of the image-code ids; they must be contiguous (ImageLayout needs a range)."""
        start, stop = int(self.bpe_of_code.min()), int(self.bpe_of_code.max()) + 1
        if stop - start != self.n_codes:
            raise ValueError(f"image-code ids are not contiguous: {self.n_codes} codes spread over [{start}, {stop})")
        return start, stop

    def to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids (any shape) -> VQ codes; a non-image id is an error."""
        codes = self.code_of_bpe[torch.as_tensor(ids, dtype=torch.long).cpu()]
        if (codes < 0).any():
            bad = torch.as_tensor(ids).cpu()[codes < 0][:5].tolist()
            raise ValueError(f"ids {bad} are not image codes; the sequence breaks the image layout")
        return codes

    def to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return self.bpe_of_code[torch.as_tensor(codes, dtype=torch.long).cpu()]


class CodeMappedAdapter(HFAdapter):
    """An :class:`HFAdapter` over a full transformers checkpoint whose image codes are found by vocabulary
    name (Lumina-mGPT, Emu3): the attributes both set up the same way."""

    def _setup(self, model: Any, backbone: Any, tokenizer: Any, cfg: Any,
               parse_code: Callable[[str], int | None]) -> dict[str, int]:
        """Model, tokenizer, config fields and the code map; returns the vocabulary (name -> id)."""
        self.name = cfg.name
        self.cfg = cfg
        self.model = model.eval()
        self.backbone = backbone
        self.lm_head = model.lm_head
        self.tokenizer = tokenizer
        self.sjd2_recipe: dict | None = None  # set by attach_sjd2_extras for SJD2 fine-tuned checkpoints
        self.timestep_mlp: torch.nn.Module | None = None
        self.image_size = int(cfg.image_size)
        self.sampling_defaults = dict(cfg.sampling_defaults)
        vocab = tokenizer.get_vocab()
        self.code_map = CodeMap.from_vocab(vocab, parse_code, self.vocab_size)
        return vocab

    def _check_positions(self) -> None:
        """The image layout after the prompt template must fit the model's position table."""
        from models.hf_loading import check_positions

        text = self.model.config.get_text_config()
        n = len(self.prompt_ids("")) + self.layout.n_tokens
        check_positions(n, getattr(text, "max_position_embeddings", None),
                        f"a {self.image_size}px image ({self.layout.n_tokens} tokens after the prompt template)")

    def image_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full image sequence [n_tokens] -> VQ codes [h, w] (mapped by name; a non-code id is an error)."""
        return self.code_map.to_codes(self.layout.code_grid(torch.as_tensor(tokens).cpu()))


def byte_level_tokenizer(names: Mapping[int, str], vocab_size: int, text_base: int, special: Mapping[str, str]):
    """A ``PreTrainedTokenizerFast`` built in code: ``names`` (id -> name) + 256 byte tokens at ``text_base``.

    Text is encoded one byte per token (no merges), so any caption works; remaining ids get filler names.
    ``special`` maps ``bos_token``/``eos_token``/``pad_token``/``unk_token`` to names in ``names``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = dict(names)
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        if text_base + i in table:
            raise ValueError(f"byte token id {text_base + i} collides with {table[text_base + i]!r}")
        table[text_base + i] = ch
    for i in range(vocab_size):
        table.setdefault(i, f"<|tiny_unused_{i}|>")
    vocab = {name: i for i, name in table.items()}
    if len(vocab) != vocab_size:
        raise ValueError("duplicate token names in the tiny vocabulary")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def load_tokenizer(ckpt: Path, hint: str, config: Any = None):
    """The checkpoint's tokenizer (``config``: the loaded model config, saves re-reading config.json)."""
    from transformers import AutoTokenizer

    kwargs = {"config": config} if config is not None else {}
    try:
        return AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True, **kwargs)
    except Exception as err:
        raise FileNotFoundError(f"no loadable tokenizer in {ckpt} ({type(err).__name__}: {err}); {hint}") from err


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"model.dtype {name!r} is not a torch dtype (use float32, bfloat16 or float16)")  # noqa: TRY004
    return dtype
