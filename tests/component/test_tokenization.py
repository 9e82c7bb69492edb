"""The encoder's direct use of the Rust tokenizer gives exactly the ids and token types of the HF
tokenizer call (single texts, batches, pairs, over-long texts), for every family's tokenizer."""
import pytest
from transformers import AutoTokenizer

from adapterserve.runtime.tokenization import TextEncoder
from tiny_models import SAMPLE_TEXTS

TEXTS = SAMPLE_TEXTS[:4] + ["Ünïcødé ça marche — 東京 🙂", "   spaces   and\ttabs\n", "x"]


def _hf(tok, texts, pairs=None, **kw):
    return tok(list(texts), list(pairs) if pairs else None, padding=False, return_attention_mask=False,
               return_token_type_ids="token_type_ids" in tok.model_input_names, verbose=False, **kw)


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "minilm"])
def test_direct_tokenizer_matches_hf_call(family, tiny_bases, minilm_dir):
    tok = AutoTokenizer.from_pretrained(minilm_dir if family == "minilm" else tiny_bases[family])
    enc = TextEncoder(tok, max_length=512)
    assert enc.backend is not None
    cases = [([t], None) for t in TEXTS] + [(TEXTS, None), (TEXTS, TEXTS[::-1]), (TEXTS[:1], TEXTS[1:2])]
    for texts, pairs in cases:
        want = _hf(tok, texts, pairs, truncation=False)
        got = enc.encode(texts, pairs)
        assert [g.input_ids for g in got] == want["input_ids"]
        if enc.uses_token_types:
            # None for a text without a pair: its types are all 0
            assert [g.token_type_ids if g.token_type_ids is not None else [0] * g.length for g in got] == want["token_type_ids"]
            assert all((g.token_type_ids is None) == (pairs is None) for g in got)
    # Over-long: cut exactly like the HF call with truncation to max_length.
    long = " ".join(["word"] * 100)
    got = TextEncoder(tok, max_length=32).encode([long, TEXTS[0]], truncate=True)
    want = _hf(tok, [long, TEXTS[0]], truncation=True, max_length=32)
    assert [g.input_ids for g in got] == want["input_ids"]
    assert [g.truncated for g in got] == [True, False]
    # The HF tokenizer's own settings are untouched by the encoder's copy.
    assert tok(long)["input_ids"] == _hf(tok, [long], truncation=False)["input_ids"][0]


@pytest.mark.parametrize("family", ["roberta", "minilm"])
def test_collate_pads_like_the_tokenizer(family, tiny_bases, minilm_dir):
    """collate's numpy scatter gives exactly the HF tokenizer's right-padded batch (ids, mask, types)."""
    import torch

    tok = AutoTokenizer.from_pretrained(minilm_dir if family == "minilm" else tiny_bases[family])
    enc = TextEncoder(tok, max_length=512)
    texts = TEXTS + ["x " * 40]
    got = enc.collate(enc.encode(texts, TEXTS[:1] * len(texts)), torch.device("cpu"))
    want = tok(texts, TEXTS[:1] * len(texts), padding=True, return_tensors="pt")
    assert set(got) == {k for k in want if k in ("input_ids", "attention_mask", "token_type_ids")}
    for k, v in got.items():
        assert v.dtype == torch.long and torch.equal(v, want[k]), k


@pytest.mark.parametrize("family", ["bert", "minilm"])
def test_collate_fills_the_token_types_of_texts_without_a_pair(family, tiny_bases, minilm_dir):
    """A text without a pair carries no token-type list (all 0): collate gives the tokenizer's batch for
    such texts alone, and beside texts with pairs each row keeps its own types."""
    import torch

    tok = AutoTokenizer.from_pretrained(minilm_dir if family == "minilm" else tiny_bases[family])
    enc = TextEncoder(tok, max_length=512)
    texts = TEXTS + ["x " * 40]
    got = enc.collate(enc.encode(texts), torch.device("cpu"))
    want = tok(texts, padding=True, return_tensors="pt")
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(got[k], want[k]), k
    mixed = enc.encode(texts[:3], TEXTS[-3:]) + enc.encode(texts[3:])
    got = enc.collate(mixed, torch.device("cpu"))
    for i, row in enumerate(mixed):
        types = row.token_type_ids if i < 3 else [0] * row.length
        assert i >= 3 or any(types)  # the pairs' second segments are type 1
        assert got["token_type_ids"][i].tolist() == types + [0] * (got["token_type_ids"].shape[1] - row.length)
        assert got["input_ids"][i, :row.length].tolist() == row.input_ids


@pytest.mark.parametrize("family", ["bert", "roberta", "minilm"])
def test_packed_collate_is_the_padded_batch_packed(family, tiny_bases, minilm_dir):
    """collate(packed=True) gives exactly what packing.pack makes of the padded batch (ids, token types,
    offsets, positions from the family's first position), with and without pairs and with both mixed."""
    import torch

    from adapterserve.runtime.engine import packing

    tok = AutoTokenizer.from_pretrained(minilm_dir if family == "minilm" else tiny_bases[family])
    enc = TextEncoder(tok, max_length=512)
    texts = TEXTS + ["x " * 40]
    cpu = torch.device("cpu")
    first = 2 if family == "roberta" else 0
    for rows in (enc.encode(texts), enc.encode(texts, texts[::-1]), enc.encode(texts[:3], texts[:3]) + enc.encode(texts[3:])):
        want = packing.pack(enc.collate(rows, cpu), first)
        got = packing.pack(enc.collate(rows, cpu, packed=True), first)
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == torch.long and torch.equal(got[k], want[k]), k
