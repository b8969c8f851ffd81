"""Specification of data/caseops.py, the CaseOps text transform, and of its datasets.

The proxy and record-compatibility checks need ../shared and skip without it.
"""

from __future__ import annotations

import importlib.util
import math
import random
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import torch
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))

import caseops  # noqa: E402
import prepare  # noqa: E402
import train_gpt as tg  # noqa: E402
from conftest import parse_line, run_train, tiny_env  # noqa: E402

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


@pytest.mark.slow
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


needs_record = pytest.mark.skipif(not RECORD_TOKENIZER.is_file() or not PROXY.is_dir(),
                                  reason="needs ../shared/anchors/record_2135 and ../shared/data/proxy")


@pytest.fixture(scope="module")
def proxy_val_with_record_tokenizer(tmp_path_factory) -> tuple[Path, list[str]]:
    """The proxy's val documents (plus 50 train documents) as a CaseOps dataset, encoded with the
    records' CaseOps tokenizer."""
    val = proxy_docs("docs_val.jsonl.gz")
    folder = tmp_path_factory.mktemp("record_caseops") / "ds"
    prepare.build_dataset(None, folder, documents=val + proxy_docs("docs_train.jsonl.gz")[:50],
                          tokenizer=RECORD_TOKENIZER, val_docs=len(val), caseops_on=True)
    return folder, val


@needs_record
def test_with_the_records_tokenizer_the_proxy_val_split_is_the_records_tokens_and_byte_sidecar(
        proxy_val_with_record_tokenizer):
    """The reference is computed the records' way: their transform, their tokenizer, and their
    byte counts over SentencePiece's piece surfaces (which need the protobuf package)."""
    pytest.importorskip("google.protobuf")
    import sentencepiece as spm
    folder, val = proxy_val_with_record_tokenizer
    record = load_record_transform()
    sp = spm.SentencePieceProcessor(model_file=str(RECORD_TOKENIZER))
    tokens, nbytes = [], []
    for doc in val:
        pieces = sp.encode(record.encode_lossless_caps_v2(doc), out_type="proto").pieces
        tokens += [prepare.BOS_ID] + [p.id for p in pieces]
        nbytes += [0] + record.surface_piece_original_byte_counts(
            [p.surface for p in pieces], text_transform_name=record.LOSSLESS_CAPS_CASEOPS_V1)
    assert np.array_equal(prepare.read_shard(folder / "fineweb_val_000000.bin"), tokens)
    assert np.array_equal(prepare.read_shard(folder / "fineweb_val_bytes_000000.bin"), nbytes)


def train_gpt_val_bytes(folder: Path) -> int:
    """The byte count train_gpt.py scores the val split with."""
    hp = types.SimpleNamespace(data_path=str(folder), tokenizer_path=str(folder / "tokenizer.model"))
    sp = prepare.load_tokenizer(folder / "tokenizer.model")
    tokens = torch.from_numpy(np.concatenate([prepare.read_shard(p) for p in prepare.shard_files(folder, "val")])
                              .astype(np.int64))
    sidecar = tg.load_byte_sidecar(hp, sp, tokens.numel(), torch.device("cpu"))
    positions = torch.arange(1, tokens.numel())
    return int(tg.count_target_bytes(tokens[:-1], tokens[1:], (sidecar,), positions).sum())


@needs_record
def test_train_gpt_counts_exactly_the_utf8_bytes_of_the_proxy_val_documents(proxy_val_with_record_tokenizer):
    folder, val = proxy_val_with_record_tokenizer
    assert train_gpt_val_bytes(folder) == sum(len(d.encode("utf-8")) for d in val) == 4_648_555


@pytest.fixture(scope="module")
def caseops_demo(tmp_path_factory) -> Path:
    """The demo corpus as CaseOps data with a small tokenizer trained on the spot."""
    folder = tmp_path_factory.mktemp("caseops_demo") / "ds"
    prepare.build_demo(folder, vocab_size=512, val_docs=40, caseops_on=True)
    return folder


def test_a_trained_caseops_tokenizer_has_the_four_markers_as_ids_4_to_7(caseops_demo):
    sp = prepare.load_tokenizer(caseops_demo / "tokenizer.model")
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(caseops.MARKERS)
    assert sp.encode("\ue001the")[0] == 4


def test_caseops_val_documents_decode_back_to_the_originals(caseops_demo):
    sp = prepare.load_tokenizer(caseops_demo / "tokenizer.model")
    tokens = prepare.read_shard(caseops_demo / "fineweb_val_000000.bin")
    starts = list(np.flatnonzero(tokens == prepare.BOS_ID)) + [tokens.size]
    decoded = [caseops.decode(sp.decode(tokens[a + 1:b].tolist())) for a, b in zip(starts[:-1], starts[1:])]
    assert decoded == prepare.demo_documents()[:40]


def test_the_sidecar_parallels_the_val_shards_and_sums_to_the_documents_utf8_bytes(caseops_demo):
    manifest = prepare.read_manifest(caseops_demo)
    assert manifest["text_transform"] == caseops.NAME
    for shard, sidecar in zip(prepare.shard_files(caseops_demo, "val"), prepare.shard_files(caseops_demo, "val_bytes")):
        assert prepare.check_shard(shard) == prepare.check_shard(sidecar)
    assert train_gpt_val_bytes(caseops_demo) == manifest["splits"]["val"]["bytes"]
    assert manifest["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in prepare.demo_documents()[:40])


def test_a_tokenizer_without_the_markers_is_refused_for_caseops(caseops_demo, tmp_path):
    plain = prepare.train_tokenizer(["The quick brown fox jumps over the lazy dog."] * 100, vocab_size=320)
    (tmp_path / "plain.model").write_bytes(plain)
    with pytest.raises(prepare.PrepareError, match="not a CaseOps tokenizer.*U\\+E001"):
        prepare.build_demo(tmp_path / "ds", tokenizer=tmp_path / "plain.model", caseops_on=True)


def demo_env(folder: Path, run_id: str, **overrides) -> dict:
    dataset = types.SimpleNamespace(path=folder, tokenizer=folder / "tokenizer.model", vocab_size=512)
    return tiny_env(dataset, run_id, NUM_LAYERS=2, ITERATIONS=6, VAL_BATCH_SIZE=65536, **overrides)


def test_train_gpt_on_caseops_data_scores_with_the_sidecar_bytes_through_ttt(caseops_demo, tmp_path):
    env = demo_env(caseops_demo, "caseops", TTT=1, TTT_LORA_RANK=4, TTT_BATCH_DOCS=8, TTT_CHUNK_TOKENS=32)
    result = run_train(tmp_path, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = parse_line(result.stdout, "val_data")
    assert int(data["bytes"]) == prepare.read_manifest(caseops_demo)["splits"]["val"]["bytes"]
    final = parse_line(result.stdout, "final_submission")
    expected = float(final["val_loss"]) * float(data["targets_per_byte"]) / math.log(2)
    assert float(final["val_bpb"]) == pytest.approx(expected, rel=1e-6)


def test_train_gpt_refuses_caseops_data_without_its_byte_sidecar(caseops_demo, tmp_path):
    copy = tmp_path / "nosidecar"
    shutil.copytree(caseops_demo, copy)
    for p in prepare.shard_files(copy, "val_bytes"):
        p.unlink()
    (copy / "manifest.json").unlink()  # with it, the missing sidecar is already refused as a changed val split
    result = run_train(tmp_path, demo_env(copy, "nosidecar"))
    assert result.returncode == 2
    assert "is a CaseOps tokenizer but" in result.stdout + result.stderr
