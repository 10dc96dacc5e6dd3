"""Tests for the bundled MiniLM encoder and the offline stdlib-docstring corpus."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from torch.export import Dim, export

from lrcc.errors import LrccError
from lrcc.zoo import corpus, minilm

TOL = 1e-5


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    return corpus.sentences()[:8]


@pytest.fixture(scope="module")
def encoders() -> dict[str, minilm.SentenceEncoder]:
    return {"plain": minilm.load_encoder("plain"), "hf": minilm.load_encoder("hf")}


def _embed(encoder: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return encoder(*batch)


def test_tokenizer_padding() -> None:
    tok = minilm.tokenizer()
    ids, mask = tok.encode(["a short one", "a somewhat longer sentence than the first"])
    assert ids.dtype == mask.dtype == torch.int64
    assert ids.shape == mask.shape and ids.shape[1] == int(mask.sum(1).max())
    assert ids[0, 0] == 101 and int(mask[0].sum()) < ids.shape[1] and ids[0, -1] == 0
    ids, mask = tok.encode(["a short one", "word " * 300], pad_to=32)
    assert ids.shape == (2, 32) and int(mask[1].sum()) == 32 and ids[1, -1] == 102


def test_plain_matches_hf(encoders: dict, sentences: list[str]) -> None:
    batch = minilm.tokenizer().encode(sentences)
    assert int((batch[1] == 0).sum()) > 0, "batch should contain padding"
    plain, hf = _embed(encoders["plain"], batch), _embed(encoders["hf"], batch)
    assert plain.shape == (8, 384)
    torch.testing.assert_close(plain.norm(dim=-1), torch.ones(8))
    assert (plain - hf).abs().max().item() <= TOL


def test_matches_sentence_transformers(encoders: dict, sentences: list[str]) -> None:
    # Must fail (not skip) when sentence-transformers is unavailable.
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm.model_dir()), device="cpu")
    expected = reference.encode(sentences, convert_to_tensor=True).cpu()
    batch = minilm.tokenizer().encode(sentences)
    for kind, encoder in encoders.items():
        got = _embed(encoder, batch)
        assert (got - expected).abs().max().item() <= TOL, kind


def test_corpus_splits() -> None:
    assert len(corpus.sentences()) >= 2500
    cal, ev = corpus.splits(n_calibration=1280, n_evaluation=512, seed=0)
    assert (len(cal), len(ev)) == (1280, 512)
    assert not set(cal) & set(ev)
    assert len(set(cal)) == 1280 and len(set(ev)) == 512
    assert (cal, ev) == corpus.splits(n_calibration=1280, n_evaluation=512, seed=0)
    assert corpus.splits(10, 5, seed=1) != corpus.splits(10, 5, seed=0)
    with pytest.raises(LrccError):
        corpus.splits(n_calibration=10**7)


@pytest.mark.parametrize("kind", ["plain", "hf"])
def test_export_dynamic_shapes(encoders: dict, kind: str) -> None:
    encoder = encoders[kind]
    tok, pool = minilm.tokenizer(), corpus.sentences()
    example = tok.encode(pool[:4], pad_to=16)
    b, n = Dim("B", min=1, max=1024), Dim("L", min=2, max=512)
    dims = {"input_ids": {0: b, 1: n}, "attention_mask": {0: b, 1: n}}
    program = export(encoder, example, dynamic_shapes=dims)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("scaled_dot_product_attention" in t for t in targets), targets
    other = tok.encode(pool[10:13], pad_to=23)
    assert int((other[1] == 0).sum()) > 0
    got = _embed(program.module(), other)
    assert got.shape == (3, 384)
    assert (got - _embed(encoder, other)).abs().max().item() <= TOL
