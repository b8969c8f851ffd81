"""Bits per byte: byte counts come from the tokenizer's pieces, so BPB does not depend on the tokenizer."""
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg

SHARED_SP1024 = Path(__file__).resolve().parents[2] / "shared/tokenizers/fineweb_1024_bpe.model"
TEXT = ("The quick brown fox jumps over the lazy dog. Parameter golf rewards small models that "
        "compress English text well, measured in bits per byte of the original UTF-8.")


def text_bytes(sp, text: str) -> int:
    ids = [1] + sp.encode(text)  # every document starts after a BOS boundary
    tables = tuple(torch.from_numpy(t) for t in tg.build_byte_tables(sp, sp.vocab_size()))
    ids = torch.tensor(ids)
    return int(tg.count_target_bytes(ids[:-1], ids[1:], tables).sum())


def test_byte_count_equals_utf8_length_on_covered_text(tiny_dataset):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_dataset.tokenizer))
    assert text_bytes(sp, TEXT) == len(TEXT.encode("utf-8"))


def test_byte_fallback_tokens_count_one_byte_each(tiny_dataset):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_dataset.tokenizer))
    text = "naïve café 日本"
    assert any(sp.is_byte(i) for i in sp.encode(text)), "test text must exercise byte pieces"
    assert text_bytes(sp, text) == len(text.encode("utf-8"))


@pytest.mark.skipif(not SHARED_SP1024.exists(), reason="official tokenizer not in ../shared")
def test_official_sp1024_counts_plain_english_exactly():
    sp = spm.SentencePieceProcessor(model_file=str(SHARED_SP1024))
    assert text_bytes(sp, TEXT) == len(TEXT.encode("utf-8"))


@pytest.fixture(scope="module")
def no_fallback_tokenizer(tmp_path_factory):
    """A tokenizer without byte fallback, like the official sp1024: unseen characters become <unk>."""
    root = tmp_path_factory.mktemp("nofallback")
    (root / "text.txt").write_text((TEXT + "\n") * 200)
    spm.SentencePieceTrainer.train(input=str(root / "text.txt"), model_prefix=str(root / "sp"), vocab_size=60,
                                   model_type="bpe", byte_fallback=False, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=3, pad_id=0, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(root / "sp.model"))


def test_unknown_piece_counts_zero_bytes_and_is_a_boundary(no_fallback_tokenizer):
    sp = no_fallback_tokenizer
    base, _, boundary = tg.build_byte_tables(sp, sp.vocab_size())
    assert base[sp.unk_id()] == 0 and boundary[sp.unk_id()]
    assert sp.unk_id() in sp.encode("日 fox")
    # The unknown character counts nothing, and the space after it is swallowed by the boundary: only "fox".
    assert text_bytes(sp, "日 fox") == 3


@pytest.mark.skipif(not SHARED_SP1024.exists(), reason="official tokenizer not in ../shared")
def test_official_sp1024_unknown_character_counts_zero_bytes():
    sp = spm.SentencePieceProcessor(model_file=str(SHARED_SP1024))
    assert text_bytes(sp, "日 fox") == 3


def test_control_tokens_and_padding_ids_carry_no_bytes(tiny_dataset):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_dataset.tokenizer))
    base, _, boundary = tg.build_byte_tables(sp, sp.vocab_size() + 8)
    for i in (0, 1, 2) + tuple(range(sp.vocab_size(), sp.vocab_size() + 8)):
        assert base[i] == 0 and boundary[i]
    assert np.all(base[4:sp.vocab_size()] >= 0)
