"""Specification of data/caseops.py, the CaseOps text transform, and of its datasets.

The proxy and record-compatibility checks need ../shared and skip without it.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))

import caseops  # noqa: E402
import prepare  # noqa: E402

SHARED = REPO.parent / "shared"
PROXY = SHARED / "data" / "proxy"
RECORD = SHARED / "anchors" / "record_2135"
RECORD_TOKENIZER = RECORD / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"

# Characters the transform must treat with care: ASCII of both cases, the markers and
# their neighbour U+E000, letters whose case mapping is not one-to-one (ß, İ, ı, ǅ, ﬁ,
# the Kelvin sign), other cased scripts, combining marks, emoji, whitespace.
TRICKY = list("AZaz09 _-'\n\t") + list(caseops.MARKERS) + ["\ue000", "\ue005"] + list(
    "ßẞİıǅǄǆﬁKΣσςÉéŒœДдԱաĲĳ\u0301\u00a0🙂𝔄")


def random_string(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.45:
            out.append(rng.choice(TRICKY))
        elif r < 0.75:
            word = "".join(rng.choice("abcXYZ") for _ in range(rng.randint(1, 6)))
            out.append(rng.choice([word, word.upper(), word.title(), word.swapcase()]))
        elif r < 0.9:
            out.append(chr(rng.randint(0x20, 0xD7FF)))
        else:
            out.append(chr(rng.randint(0xE000, 0x10FFFF)))
    return "".join(out)


def proxy_docs(name: str) -> list[str]:
    return list(prepare.iter_documents([(PROXY / name, "jsonl")]))


needs_proxy = pytest.mark.skipif(not PROXY.is_dir(), reason="needs ../shared/data/proxy")


# --------------------------------------------------------------------------- the transform


def test_caseops_round_trips_random_unicode_exactly():
    rng = random.Random(2026)
    for _ in range(20_000):
        text = random_string(rng)
        assert caseops.decode(caseops.encode(text)) == text, repr(text)


@pytest.mark.parametrize("text, encoded", [
    ("The Golf", "\ue001the \ue001golf"),
    ("BPB of GPT-2", "\ue002bpb of \ue002gpt-2"),
    ("iPhone McDonald A", "i\ue003phone \ue001mc\ue003donald \ue001a"),
    ("\ue001 stays", "\ue004\ue001 stays"),
    ("Straße ÉCOLE İx", "\ue001straße É\ue002cole İx"),
])
def test_capitals_become_markers_and_lowercase_letters(text, encoded):
    assert caseops.encode(text) == encoded


def test_the_transformed_text_has_no_ascii_capitals():
    rng = random.Random(1)
    for _ in range(2000):
        encoded = caseops.encode(random_string(rng))
        assert not any("A" <= c <= "Z" for c in encoded)


@pytest.mark.parametrize("bad", ["\ue001", "x\ue002 y", "\ue003\ue003a", "\ue004x", "a\ue001"])
def test_decode_rejects_a_marker_that_marks_nothing(bad):
    with pytest.raises(caseops.CaseOpsError, match="marker U\\+E00"):
        caseops.decode(bad)


def test_original_bytes_of_any_cut_into_pieces_sum_to_the_original_utf8_bytes():
    rng = random.Random(7)
    for _ in range(5000):
        text = random_string(rng)
        encoded = caseops.encode(text)
        cuts = sorted(rng.sample(range(len(encoded) + 1), min(len(encoded) + 1, rng.randint(0, 8))))
        pieces = [encoded[a:b] for a, b in zip([0] + cuts, cuts + [len(encoded)])]
        assert sum(caseops.original_bytes(pieces)) == len(text.encode("utf-8")), repr(text)


def test_markers_count_zero_bytes_and_an_escaped_marker_counts_its_own_three():
    assert caseops.original_bytes(["\ue001", "the", " \ue002", "bpb"]) == [0, 3, 1, 3]
    assert caseops.original_bytes(["\ue004", "", "\ue001x"]) == [0, 0, 4]


@needs_proxy
@pytest.mark.parametrize("name", ["docs_val.jsonl.gz", "docs_train.jsonl.gz"])
def test_caseops_round_trips_every_proxy_document(name):
    docs = proxy_docs(name)
    assert len(docs) >= 2500
    changed = 0
    for doc in docs:
        encoded = caseops.encode(doc)
        assert caseops.decode(encoded) == doc
        changed += encoded != doc
    assert changed > 0.9 * len(docs)  # real text has capitals: the transform did something


# --------------------------------------------------------------------------- datasets


def load_record_transform():
    spec = importlib.util.spec_from_file_location("record_lossless_caps", RECORD / "lossless_caps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not RECORD_TOKENIZER.is_file() or not PROXY.is_dir(),
                    reason="needs ../shared/anchors/record_2135 and ../shared/data/proxy")
def test_with_the_records_tokenizer_the_proxy_val_split_is_the_records_tokens_and_byte_sidecar(tmp_path):
    """The reference is computed the records' way: their transform, their tokenizer, and their
    byte counts over SentencePiece's piece surfaces (which need the protobuf package)."""
    pytest.importorskip("google.protobuf")
    import sentencepiece as spm
    record = load_record_transform()
    val = proxy_docs("docs_val.jsonl.gz")
    train = proxy_docs("docs_train.jsonl.gz")[:50]
    prepare.build_dataset(None, tmp_path / "ds", documents=val + train, tokenizer=RECORD_TOKENIZER,
                          val_docs=len(val), caseops_on=True)
    sp = spm.SentencePieceProcessor(model_file=str(RECORD_TOKENIZER))
    tokens, nbytes = [], []
    for doc in val:
        pieces = sp.encode(record.encode_lossless_caps_v2(doc), out_type="proto").pieces
        tokens += [prepare.BOS_ID] + [p.id for p in pieces]
        nbytes += [0] + record.surface_piece_original_byte_counts(
            [p.surface for p in pieces], text_transform_name=record.LOSSLESS_CAPS_CASEOPS_V1)
    assert np.array_equal(prepare.read_shard(tmp_path / "ds" / "fineweb_val_000000.bin"), tokens)
    assert np.array_equal(prepare.read_shard(tmp_path / "ds" / "fineweb_val_bytes_000000.bin"), nbytes)
