"""Specification of data/prepare.py, the dataset tool.

Everything here runs offline on a fresh clone. The proxy byte-identity check needs the
shared proxy corpus beside the repo and PG_SLOW=1.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))
sys.path.insert(0, str(REPO / "tests"))

import prepare  # noqa: E402
from hf_standin import StandIn  # noqa: E402

PREPARE = REPO / "data" / "prepare.py"
SHARED = REPO.parent / "shared"


# --------------------------------------------------------------------------- helpers

WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be or "
         "model token data shard val train golf bits byte compress learn small quick brown fox").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """English-like documents with the awkward parts real text has: leading and trailing
    spaces, tabs, runs of spaces, newlines and blank lines, non-ASCII and emoji."""
    rnd = random.Random(seed)
    extras = ["café", "naïve", "日本語", "🙂", "\t", "  ", "x\u00a0y", "1234", "—", "\\"]
    docs = []
    for i in range(n):
        lines = []
        for _ in range(rnd.randint(1, 4)):
            words = [rnd.choice(WORDS) for _ in range(rnd.randint(3, 30))]
            if rnd.random() < 0.5:
                words.insert(rnd.randrange(len(words)), rnd.choice(extras))
            lines.append(" ".join(words))
        sep = "\n\n" if i % 3 == 0 else "\n"
        docs.append((" " if i % 7 == 0 else "") + sep.join(lines) + ("  " if i % 5 == 0 else ""))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "id": len(d)}, ensure_ascii=False) + "\n")
    return path


def split_docs(tokens: np.ndarray) -> list[list[int]]:
    starts = np.flatnonzero(tokens == prepare.BOS_ID)
    assert tokens.size == 0 or starts[0] == 0, "every split must start with BOS"
    return [tokens[a + 1:b].tolist() for a, b in zip(starts, list(starts[1:]) + [tokens.size])]


def split_tokens(folder: Path, split: str) -> np.ndarray:
    parts = [prepare.read_shard(p) for p in prepare.shard_files(folder, split)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def decoded_split(folder: Path, split: str) -> list[str]:
    sp = prepare.load_tokenizer(folder / "tokenizer.model")
    return [sp.decode(ids) for ids in split_docs(split_tokens(folder, split))]


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run_cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PREPARE), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def cli_error(capsys, *args) -> str:
    """Run main() in-process; a user mistake must give exit code 2 and one 'error:' line."""
    code = prepare.main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_docs(120)


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory, docs) -> Path:
    """A small byte-fallback BPE with identity normalisation, plus its .vocab beside it."""
    folder = tmp_path_factory.mktemp("tok")
    model = prepare.train_tokenizer(make_docs(400, seed=1), vocab_size=400)
    (folder / "tiny.model").write_bytes(model)
    sp = prepare.load_tokenizer(model)
    (folder / "tiny.vocab").write_text(prepare.vocab_text(sp), encoding="utf-8")
    return folder / "tiny.model"


@pytest.fixture(scope="module")
def built(tmp_path_factory, docs) -> tuple[Path, dict]:
    """A dataset built from JSONL with a trained tokenizer and several shards per split."""
    root = tmp_path_factory.mktemp("built")
    src = write_jsonl(root / "docs.jsonl.gz", docs)
    manifest = prepare.build_dataset([src], root / "ds", vocab_size=400, val_docs=30, shard_tokens=500)
    return root / "ds", manifest


# --------------------------------------------------------------------------- shard format


def test_shard_has_the_challenge_header_then_little_endian_uint16_tokens(tmp_path):
    tokens = np.array([1, 2, 65535, 0, 300], dtype=np.uint16)
    prepare.write_shard(tmp_path / "s.bin", tokens)
    raw = (tmp_path / "s.bin").read_bytes()
    assert struct.unpack("<3i", raw[:12]) == (20240520, 1, 5)
    assert raw[12:1024] == bytes(1012)
    assert raw[1024:] == struct.pack("<5H", 1, 2, 65535, 0, 300)
    assert prepare.read_shard(tmp_path / "s.bin").tolist() == tokens.tolist()


@pytest.mark.parametrize("damage, message", [
    (lambda b: struct.pack("<i", 1234) + b[4:], "magic 1234"),
    (lambda b: b[:4] + struct.pack("<i", 2) + b[8:], "version 2"),
    (lambda b: b[:-2], "file has"),
    (lambda b: b[:100], "shorter than"),
])
def test_read_shard_rejects_malformed_files_with_the_reason(tmp_path, damage, message):
    prepare.write_shard(tmp_path / "s.bin", np.arange(10, dtype=np.uint16))
    path = tmp_path / "s.bin"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(prepare.PrepareError, match=message):
        prepare.read_shard(path)


# --------------------------------------------------------------------------- building


def test_round_trip_text_to_shards_to_text_gives_the_documents_back(built, docs):
    folder, _ = built
    assert decoded_split(folder, "val") + decoded_split(folder, "train") == docs


def test_val_split_is_exactly_the_first_n_documents_in_input_order(tmp_path, docs):
    first = write_jsonl(tmp_path / "b.jsonl", docs[:50])
    second = write_jsonl(tmp_path / "a.jsonl", docs[50:])
    prepare.build_dataset([first, second], tmp_path / "ds", vocab_size=400, val_docs=60)
    assert decoded_split(tmp_path / "ds", "val") == docs[:60]
    assert decoded_split(tmp_path / "ds", "train") == docs[60:]


def test_every_document_is_bos_then_its_ids_with_no_eos(built, docs):
    folder, _ = built
    sp = prepare.load_tokenizer(folder / "tokenizer.model")
    expected = [prepare.BOS_ID] + sp.encode(docs[0])
    assert split_tokens(folder, "val")[:len(expected) + 1].tolist() == expected + [prepare.BOS_ID]


def test_manifest_counts_and_hashes_match_the_files(built, docs):
    folder, manifest = built
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk == manifest and manifest["complete"] is True
    assert set(manifest["shards"]) == {p.name for p in prepare.shard_files(folder)}
    for name, entry in manifest["shards"].items():
        assert entry["tokens"] == prepare.check_shard(folder / name)
        assert entry["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    for split, part in (("val", docs[:30]), ("train", docs[30:])):
        tokens = split_tokens(folder, split)
        assert manifest["splits"][split] == {
            "docs": len(part),
            "bytes": sum(len(d.encode("utf-8")) for d in part),
            "tokens": int(tokens.size),
        }
        assert int((tokens == prepare.BOS_ID).sum()) == len(part)
    assert manifest["vocab_size"] == prepare.load_tokenizer(folder / "tokenizer.model").vocab_size() == 400
    assert manifest["tokenizer"] == "tokenizer.model"
    assert manifest["tokenizer_sha256"] == hashlib.sha256((folder / "tokenizer.model").read_bytes()).hexdigest()
    assert {"source", "tokenizer", "vocab_size", "splits", "shards"} <= set(manifest)


def test_shards_are_full_except_the_last_of_each_split(built):
    folder, manifest = built
    for split in ("val", "train"):
        counts = [prepare.check_shard(p) for p in prepare.shard_files(folder, split)]
        assert len(counts) >= 2, "the fixture is meant to need several shards per split"
        assert all(c == manifest["shard_tokens"] for c in counts[:-1])
        assert 0 < counts[-1] <= manifest["shard_tokens"]


def test_plain_text_files_hold_blank_line_separated_documents(tmp_path):
    (tmp_path / "t.txt").write_text("a first\ndoc\n\n\n  second doc  \n \t \nthird\n", encoding="utf-8")
    files = prepare.expand_inputs([tmp_path / "t.txt"])
    assert list(prepare.iter_documents(files)) == ["a first\ndoc", "  second doc  ", "third"]


def test_a_folder_gives_one_document_per_file_in_sorted_order_skipping_hidden_files(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "2.txt").write_text("two\n\nstill two\n", encoding="utf-8")
    (d / "10.txt").write_text("ten", encoding="utf-8")
    (d / "sub" / "x.md").write_text("nested", encoding="utf-8")
    (d / ".hidden").write_text("skip me", encoding="utf-8")
    write_jsonl(d / "more.jsonl", ["j1", "j2"])
    files = prepare.expand_inputs([d])
    assert list(prepare.iter_documents(files)) == ["ten", "two\n\nstill two", "j1", "j2", "nested"]


def test_an_existing_tokenizer_is_copied_into_the_dataset_with_its_vocab(tmp_path, tok_model, docs):
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    manifest = prepare.build_dataset([src], tmp_path / "ds", tokenizer=tok_model, val_docs=10)
    assert (tmp_path / "ds" / "tokenizer.model").read_bytes() == tok_model.read_bytes()
    assert (tmp_path / "ds" / "tokenizer.vocab").read_bytes() == tok_model.with_suffix(".vocab").read_bytes()
    assert manifest["tokenizer_source"] == str(tok_model)
    assert decoded_split(tmp_path / "ds", "val") == docs[:10]


def test_rebuilding_the_same_dataset_overwrites_it_with_identical_bytes(tmp_path, docs):
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    prepare.build_dataset([src], tmp_path / "ds", vocab_size=400, val_docs=10)
    before = folder_digest(tmp_path / "ds")
    prepare.build_dataset([src], tmp_path / "ds", vocab_size=400, val_docs=10)
    assert folder_digest(tmp_path / "ds") == before


def test_an_interrupted_build_leaves_the_folder_as_it_was(tmp_path, docs):
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    (tmp_path / "ds").mkdir()
    with pytest.raises(prepare.PrepareError, match="lower --val-docs"):
        prepare.build_dataset([src], tmp_path / "ds", vocab_size=400, val_docs=len(docs))
    assert list((tmp_path / "ds").iterdir()) == []


# --------------------------------------------------------------------------- errors


def test_missing_input_is_a_one_line_error(tmp_path, capsys):
    msg = cli_error(capsys, "--input", tmp_path / "nope.txt", "--out", tmp_path / "ds")
    assert "input not found" in msg and "nope.txt" in msg


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_input_is_a_one_line_error(tmp_path, capsys, content):
    (tmp_path / "empty.txt").write_text(content)
    msg = cli_error(capsys, "--input", tmp_path / "empty.txt", "--out", tmp_path / "ds", "--val-docs", "0")
    assert "no documents" in msg


def test_empty_input_folder_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "contains no files" in cli_error(capsys, "--input", tmp_path / "empty", "--out", tmp_path / "ds")


def test_malformed_jsonl_names_the_file_and_line(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    msg = cli_error(capsys, "--input", tmp_path / "d.jsonl", "--out", tmp_path / "ds")
    assert "d.jsonl:2" in msg and '"text"' in msg


def test_non_utf8_text_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert "not UTF-8" in cli_error(capsys, "--input", tmp_path / "latin1.txt", "--out", tmp_path / "ds")


def _oversized_model(base: bytes, extra: int) -> bytes:
    # Appending pieces to a serialized ModelProto extends its repeated `pieces` field;
    # this makes a real SentencePiece model with a >65,535 vocab without training one.
    def piece(text: str) -> bytes:
        b = text.encode()
        inner = b"\x0a" + bytes([len(b)]) + b + b"\x15" + struct.pack("<f", 0.0) + b"\x18\x01"
        return b"\x0a" + bytes([len(inner)]) + inner
    return base + b"".join(piece(f"zq{i}") for i in range(extra))


def test_a_tokenizer_with_more_than_65535_tokens_is_refused(tmp_path, capsys, tok_model, docs):
    big = tmp_path / "big.model"
    big.write_bytes(_oversized_model(tok_model.read_bytes(), 65536 - 400))
    assert prepare.load_tokenizer.__module__  # sanity: real loader, no stubs
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    msg = cli_error(capsys, "--input", src, "--out", tmp_path / "ds", "--tokenizer", big)
    assert "65,536 tokens" in msg and "65,535" in msg
    assert not (tmp_path / "ds").exists()


def test_a_vocab_size_above_65535_is_refused_before_training(tmp_path, capsys, docs):
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    assert "65,535" in cli_error(capsys, "--input", src, "--out", tmp_path / "ds", "--vocab-size", "70000")


def test_a_folder_holding_a_different_dataset_is_refused_and_left_untouched(tmp_path, capsys, docs):
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    prepare.build_dataset([src], tmp_path / "ds", vocab_size=400, val_docs=10)
    before = folder_digest(tmp_path / "ds")
    msg = cli_error(capsys, "--input", src, "--out", tmp_path / "ds", "--vocab-size", "400", "--val-docs", "20")
    assert "different dataset" in msg and "val_docs" in msg
    other = write_jsonl(tmp_path / "other.jsonl", docs[::-1])
    msg = cli_error(capsys, "--input", other, "--out", tmp_path / "ds", "--vocab-size", "400", "--val-docs", "10")
    assert "different dataset" in msg and "content_sha256" in msg
    assert folder_digest(tmp_path / "ds") == before


def test_a_folder_with_shards_but_no_manifest_is_refused(tmp_path, capsys, docs):
    (tmp_path / "ds").mkdir()
    prepare.write_shard(tmp_path / "ds" / "fineweb_train_000000.bin", np.ones(5, np.uint16))
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    assert "no manifest.json" in cli_error(capsys, "--input", src, "--out", tmp_path / "ds", "--val-docs", "5")


def test_a_non_empty_folder_the_tool_did_not_make_is_refused_and_left_untouched(tmp_path, capsys, docs):
    out = tmp_path / "ds"
    (out / prepare.TMP_DIR).mkdir(parents=True)
    (out / prepare.TMP_DIR / "mine.txt").write_text("not the tool's")
    (out / "tokenizer.model").write_bytes(b"someone else's tokenizer")
    before = folder_digest(out)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    msg = cli_error(capsys, "--input", src, "--out", out, "--vocab-size", "400", "--val-docs", "10")
    assert "not made by data/prepare.py" in msg and "empty folder" in msg and "--force" in msg
    assert folder_digest(out) == before
    assert (out / prepare.TMP_DIR / "mine.txt").read_text() == "not the tool's"


def test_force_writes_into_a_folder_the_tool_did_not_make_keeping_unrelated_files(tmp_path, docs):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(b"someone else's tokenizer")
    (out / "notes.txt").write_text("keep me")
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    assert prepare.main(["--input", str(src), "--out", str(out), "--vocab-size", "400", "--val-docs", "10",
                         "--force"]) == 0
    assert decoded_split(out, "val") == docs[:10]
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_folder_left_by_a_killed_build_is_resumed_without_force(tmp_path, docs):
    out = tmp_path / "ds"
    out.mkdir()
    prepare._fresh_tmp(out)  # what a build killed before its first manifest leaves behind
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    prepare.build_dataset([src], out, vocab_size=400, val_docs=10)
    assert decoded_split(out, "val") == docs[:10] and not (out / prepare.TMP_DIR).exists()


@pytest.mark.slow
def test_out_pointing_at_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "ds").write_text("a file")
    msg = cli_error(capsys, "--out", tmp_path / "ds")
    assert str(tmp_path / "ds") in msg and "not a folder" in msg
    assert (tmp_path / "ds").read_text() == "a file"


@pytest.mark.parametrize("where", ["build", "inspect"])
@pytest.mark.parametrize("kind", ["empty", "folder"])
def test_an_empty_or_unreadable_tokenizer_is_a_one_line_error(built, tmp_path, docs, where, kind):
    tok = tmp_path / "bad.model"
    if kind == "empty":
        tok.write_bytes(b"")
    else:
        tok.mkdir()  # unreadable as a file even for root, unlike chmod 000
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    args = (["--input", src, "--out", tmp_path / "ds", "--val-docs", "10"] if where == "build"
            else ["--inspect", built[0]])
    result = run_cli(*args, "--tokenizer", tok)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and str(tok) in result.stderr


# --------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict, float]:
    out = tmp_path_factory.mktemp("demo") / "demo"
    t0 = time.monotonic()
    manifest = prepare.build_demo(out)
    return out, manifest, time.monotonic() - t0


@pytest.mark.slow
def test_demo_builds_offline_in_under_30_seconds_with_enough_val_tokens(demo):
    out, manifest, seconds = demo
    assert seconds < 30
    assert manifest["splits"]["val"]["docs"] == prepare.DEMO_VAL_DOCS
    assert manifest["splits"]["val"]["tokens"] >= 100_000
    assert manifest["splits"]["train"]["tokens"] > manifest["splits"]["val"]["tokens"]
    assert manifest["vocab_size"] == 1024
    assert {p.name for p in out.iterdir()} == {"fineweb_val_000000.bin", "fineweb_train_000000.bin",
                                               "tokenizer.model", "tokenizer.vocab", "manifest.json"}


@pytest.mark.slow
def test_demo_is_byte_identical_from_run_to_run(demo, tmp_path):
    out, _, _ = demo
    result = run_cli("--out", tmp_path / "again")
    assert result.returncode == 0, result.stderr
    assert "DATA_PATH=" in result.stdout
    assert folder_digest(tmp_path / "again") == folder_digest(out)


@pytest.mark.slow
def test_demo_text_round_trips_through_its_own_tokenizer(demo):
    out, _, _ = demo
    val = decoded_split(out, "val")
    assert len(val) == prepare.DEMO_VAL_DOCS
    assert all(doc.startswith("Module ") for doc in val)
    assert val == prepare.demo_documents()[:prepare.DEMO_VAL_DOCS]


# --------------------------------------------------------------------------- inspect


def test_inspect_lists_shards_counts_id_range_and_decodes_the_val_start(built, docs, capsys):
    folder, manifest = built
    assert prepare.main(["--inspect", str(folder), "--tokens", "200"]) == 0
    out = capsys.readouterr().out
    for name, entry in manifest["shards"].items():
        assert name in out and f"{entry['tokens']:,}" in out
    assert f"val: {len(prepare.shard_files(folder, 'val'))} shard(s), {manifest['splits']['val']['tokens']:,} tokens" in out
    assert "token ids: 1 .. " in out and "(vocab size 400)" in out
    assert "[BOS]" + docs[0] in out


def test_inspect_reports_a_damaged_shard(built, tmp_path, capsys):
    folder, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    victim = prepare.shard_files(copy, "train")[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    msg = cli_error(capsys, "--inspect", copy)
    assert victim.name in msg and "1 problem" in msg


@pytest.mark.parametrize("keep_manifest", [True, False])
def test_inspect_reports_a_token_id_beyond_the_tokenizer_vocab(built, tmp_path, capsys, keep_manifest):
    folder, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, ignore=None if keep_manifest else shutil.ignore_patterns("manifest.json"))
    victim = prepare.shard_files(copy, "val")[0]
    tokens = prepare.read_shard(victim).copy()
    tokens[3] = 5000  # inside the decoded head, and past the 400-token vocab
    prepare.write_shard(victim, tokens)
    msg = cli_error(capsys, "--inspect", copy)
    assert victim.name in msg and "5000" in msg and "400" in msg


# --------------------------------------------------------------------------- download

DATASET = "datasets/datasets/fineweb10B_sp1024"


def published(tok_model: Path, n_val=1, n_train=3, seed=0) -> dict[str, bytes]:
    """A miniature of the published export: manifest, shards, tokenizer."""
    rng = np.random.default_rng(seed)
    sizes = {f"fineweb_val_{i:06d}.bin": 3000 + i for i in range(n_val)}
    sizes.update({f"fineweb_train_{i:06d}.bin": 20000 + 1000 * i for i in range(n_train)})
    files = {f"{DATASET}/{name}": prepare.shard_header(n) + rng.integers(0, 400, n).astype("<u2").tobytes()
             for name, n in sizes.items()}
    manifest = {
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "vocab_size": 400,
                      "path": "datasets/fineweb10B_sp1024",
                      "stats": {"files_val": n_val, "files_train": n_train, "docs_val": 50, "docs_train": 900}}],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
    }
    files["datasets/manifest.json"] = json.dumps(manifest).encode()
    files["datasets/tokenizers/fineweb_1024_bpe.model"] = tok_model.read_bytes()
    files["datasets/tokenizers/fineweb_1024_bpe.vocab"] = tok_model.with_suffix(".vocab").read_bytes()
    return files


def hf_env(tmp_path: Path, url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "MATCHED_FINEWEB_REPO_ID"}
    env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    return env


def test_download_fetches_val_tokenizer_and_only_the_first_n_train_shards(tmp_path, tok_model):
    files = published(tok_model)
    with StandIn(files) as hub:
        manifest = prepare.download_variant("sp1024", tmp_path / "ds", train_shards=2, endpoint=hub.url)
    out = tmp_path / "ds"
    for name in ("fineweb_val_000000.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin"):
        assert (out / name).read_bytes() == files[f"{DATASET}/{name}"]
    assert not (out / "fineweb_train_000002.bin").exists()
    assert hub.gets(f"{DATASET}/fineweb_train_000002.bin") == []
    assert {repo for _, repo, _, _ in hub.log} == {"willdepueoai/parameter-golf"}
    assert (out / "tokenizer.model").read_bytes() == tok_model.read_bytes()
    assert manifest["complete"] and manifest["vocab_size"] == 400
    assert manifest["splits"]["val"] == {"docs": 50, "bytes": None, "tokens": 3000, "shards": 1}
    assert manifest["splits"]["train"]["tokens"] == 20000 + 21000
    for name, entry in manifest["shards"].items():
        assert entry["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["fineweb_val_000000.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin",
         "tokenizer.model", "tokenizer.vocab", "manifest.json"])


def test_download_into_the_upstream_layout_also_puts_the_tokenizer_where_train_gpt_looks(tmp_path, tok_model):
    out = tmp_path / "data" / "datasets" / "fineweb10B_sp1024"
    with StandIn(published(tok_model)) as hub:
        prepare.download_variant("sp1024", out, train_shards=1, endpoint=hub.url)
    tokenizers = tmp_path / "data" / "tokenizers"
    assert (tokenizers / "fineweb_1024_bpe.model").read_bytes() == tok_model.read_bytes()
    assert (tokenizers / "fineweb_1024_bpe.vocab").read_bytes() == tok_model.with_suffix(".vocab").read_bytes()
    assert (out / "tokenizer.model").read_bytes() == tok_model.read_bytes()


def test_download_recovers_from_a_connection_dropped_mid_file(tmp_path, tok_model):
    files = published(tok_model)
    victim = f"{DATASET}/fineweb_train_000001.bin"
    with StandIn(files) as hub:
        hub.drop_once[victim] = 5000
        prepare.download_variant("sp1024", tmp_path / "ds", train_shards=3, endpoint=hub.url)
    assert len(hub.gets(victim)) == 2
    assert (tmp_path / "ds" / "fineweb_train_000001.bin").read_bytes() == files[victim]


def test_download_resumes_after_being_killed_mid_file_keeping_finished_shards(tmp_path, tok_model):
    files = published(tok_model)
    victim = f"{DATASET}/fineweb_train_000001.bin"
    out = tmp_path / "ds"
    with StandIn(files) as hub:
        hub.stall[victim] = 4000
        proc = subprocess.Popen([sys.executable, str(PREPARE), "--variant", "sp1024", "--train-shards", "3",
                                 "--out", str(out)], env=hf_env(tmp_path, hub.url), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert hub.stalled.wait(60), "the download never reached the stalled shard"
        finally:
            proc.kill()
            proc.wait(30)
        hub.stall.clear()
        assert (out / "fineweb_train_000000.bin").read_bytes() == files[f"{DATASET}/fineweb_train_000000.bin"]
        assert not (out / "fineweb_train_000001.bin").exists(), "a partial file must never get a shard's name"
        assert json.loads((out / "manifest.json").read_text())["complete"] is False

        prepare.download_variant("sp1024", out, train_shards=3, endpoint=hub.url)
    for i in range(3):
        name = f"fineweb_train_{i:06d}.bin"
        assert (out / name).read_bytes() == files[f"{DATASET}/{name}"]
    assert len(hub.gets(f"{DATASET}/fineweb_train_000000.bin")) == 1, "finished shards are not fetched again"
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    assert not (out / prepare.TMP_DIR).exists()


def test_download_rejects_a_corrupt_shard_with_a_clear_error(tmp_path, tok_model):
    files = published(tok_model)
    victim = f"{DATASET}/fineweb_train_000001.bin"
    files[victim] = struct.pack("<i", 12345) + files[victim][4:]
    with StandIn(files) as hub:
        result = run_cli("--variant", "sp1024", "--train-shards", "3", "--out", tmp_path / "ds",
                         env=hf_env(tmp_path, hub.url))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: downloaded fineweb_train_000001.bin is not a valid shard: magic 12345")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ds" / "fineweb_train_000001.bin").exists()
    assert (tmp_path / "ds" / "fineweb_train_000000.bin").exists()


def test_download_rejects_a_shard_whose_size_disagrees_with_its_header(tmp_path, tok_model):
    files = published(tok_model)
    victim = f"{DATASET}/fineweb_val_000000.bin"
    files[victim] = files[victim][:-2]
    with StandIn(files) as hub:
        with pytest.raises(prepare.PrepareError, match=r"fineweb_val_000000.bin .*header says 3000 tokens"):
            prepare.download_variant("sp1024", tmp_path / "ds", train_shards=1, endpoint=hub.url)


def test_download_never_replaces_good_files_with_bad_ones(tmp_path, tok_model):
    files = published(tok_model)
    out = tmp_path / "ds"
    with StandIn(files) as hub:
        prepare.download_variant("sp1024", out, train_shards=2, endpoint=hub.url)
    good = folder_digest(out)

    broken = dict(files)
    broken[f"{DATASET}/fineweb_train_000001.bin"] = b"garbage"
    broken["datasets/tokenizers/fineweb_1024_bpe.model"] = b"not a model"
    with StandIn(broken) as hub:
        with pytest.raises(prepare.PrepareError, match="not a SentencePiece model"):
            prepare.download_variant("sp1024", out, train_shards=3, endpoint=hub.url)
    assert folder_digest(out)["tokenizer.model"] == good["tokenizer.model"]

    broken["datasets/tokenizers/fineweb_1024_bpe.model"] = files["datasets/tokenizers/fineweb_1024_bpe.model"]
    with StandIn(broken) as hub:
        prepare.download_variant("sp1024", out, train_shards=3, endpoint=hub.url)
        assert hub.gets(f"{DATASET}/fineweb_train_000001.bin") == []
    after = folder_digest(out)
    assert {k: after[k] for k in good if k.endswith(".bin")} == {k: v for k, v in good.items() if k.endswith(".bin")}
    assert "fineweb_train_000002.bin" in after


def test_download_refuses_more_train_shards_than_published(tmp_path, tok_model):
    with StandIn(published(tok_model)) as hub:
        with pytest.raises(prepare.PrepareError, match="only 3 train shards"):
            prepare.download_variant("sp1024", tmp_path / "ds", train_shards=4, endpoint=hub.url)


def test_download_refuses_a_folder_holding_a_built_dataset(built, tmp_path, tok_model):
    folder, _ = built
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.json").write_bytes((folder / "manifest.json").read_bytes())
    with pytest.raises(prepare.PrepareError, match="different dataset"):
        prepare.download_variant("sp1024", copy, train_shards=1, endpoint="http://127.0.0.1:9")


def test_download_refuses_a_non_empty_folder_the_tool_did_not_make(tmp_path, tok_model):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(b"someone else's tokenizer")
    with pytest.raises(prepare.PrepareError, match="not made by data/prepare.py.*--force"):
        prepare.download_variant("sp1024", out, train_shards=1, endpoint="http://127.0.0.1:9")
    assert (out / "tokenizer.model").read_bytes() == b"someone else's tokenizer"
    with StandIn(published(tok_model)) as hub:
        prepare.download_variant("sp1024", out, train_shards=1, endpoint=hub.url, force=True)
    assert (out / "tokenizer.model").read_bytes() == tok_model.read_bytes()


def test_download_without_huggingface_hub_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(prepare.PrepareError, match="pip install huggingface_hub"):
        prepare.download_variant("sp1024", tmp_path / "ds", train_shards=1)


CASEOPS_DIR = "datasets/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
CASEOPS_MODEL = "datasets/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


@pytest.fixture(scope="module")
def caseops_model() -> bytes:
    return prepare.train_tokenizer([prepare.caseops.encode(d) for d in make_docs(300, seed=2)], vocab_size=400,
                                   reserved=prepare.caseops.MARKERS)


def published_caseops(model: bytes, n_val=2, n_train=3) -> dict[str, bytes]:
    """A miniature of the CaseOps export: no manifest, val shards each with a byte sidecar."""
    rng = np.random.default_rng(1)
    shard = lambda n, top: prepare.shard_header(n) + rng.integers(0, top, n).astype("<u2").tobytes()  # noqa: E731
    files = {CASEOPS_MODEL: model}
    for i in range(n_val):
        files[f"{CASEOPS_DIR}/fineweb_val_{i:06d}.bin"] = shard(2000 + i, 400)
        files[f"{CASEOPS_DIR}/fineweb_val_bytes_{i:06d}.bin"] = shard(2000 + i, 5)
    for i in range(n_train):
        files[f"{CASEOPS_DIR}/fineweb_train_{i:06d}.bin"] = shard(9000 + i, 400)
    return files


def test_caseops_download_fetches_every_val_shard_its_sidecar_and_the_first_n_train_shards(tmp_path, caseops_model):
    files = published_caseops(caseops_model)
    out = tmp_path / "ds"
    with StandIn(files) as hub:
        manifest = prepare.download_variant("sp8192_caseops", out, train_shards=2, endpoint=hub.url)
    assert {repo for _, repo, _, _ in hub.log} == {"romeerp/parameter-golf-caseops-v1"}
    expect = [f"fineweb_val_{i:06d}.bin" for i in range(2)] + [f"fineweb_val_bytes_{i:06d}.bin" for i in range(2)] + \
             [f"fineweb_train_{i:06d}.bin" for i in range(2)]
    for name in expect:
        assert (out / name).read_bytes() == files[f"{CASEOPS_DIR}/{name}"], name
    assert not (out / "fineweb_train_000002.bin").exists()
    assert (out / "tokenizer.model").read_bytes() == caseops_model
    assert manifest["text_transform"] == prepare.caseops.NAME and manifest["complete"]
    assert manifest["splits"]["val"]["tokens"] == 4001 and manifest["splits"]["val"]["shards"] == 2
    sidecar = sum(int(np.frombuffer(files[f"{CASEOPS_DIR}/fineweb_val_bytes_{i:06d}.bin"][1024:], "<u2").sum())
                  for i in range(2))
    assert manifest["splits"]["val"]["sidecar_bytes"] == sidecar
    assert set(manifest["shards"]) == set(expect)


def test_caseops_download_refuses_a_sidecar_that_does_not_match_its_val_shard(tmp_path, caseops_model):
    files = published_caseops(caseops_model)
    name = f"{CASEOPS_DIR}/fineweb_val_bytes_000001.bin"
    files[name] = prepare.shard_header(5) + bytes(10)
    with StandIn(files) as hub:
        with pytest.raises(prepare.PrepareError, match="val_bytes_000001.bin does not have one entry per token"):
            prepare.download_variant("sp8192_caseops", tmp_path / "ds", train_shards=1, endpoint=hub.url)


def test_caseops_download_refuses_a_tokenizer_without_the_markers(tmp_path, caseops_model, tok_model):
    files = published_caseops(caseops_model)
    files[CASEOPS_MODEL] = tok_model.read_bytes()
    with StandIn(files) as hub:
        with pytest.raises(prepare.PrepareError, match="not a CaseOps tokenizer"):
            prepare.download_variant("sp8192_caseops", tmp_path / "ds", train_shards=1, endpoint=hub.url)


def test_caseops_download_refuses_more_train_shards_than_published(tmp_path, caseops_model):
    with StandIn(published_caseops(caseops_model)) as hub:
        with pytest.raises(prepare.PrepareError, match="only 3 train shards"):
            prepare.download_variant("sp8192_caseops", tmp_path / "ds", train_shards=4, endpoint=hub.url)


# --------------------------------------------------------------------------- proxy identity (slow)

PROXY = SHARED / "data" / "proxy"


@pytest.mark.skipif(os.environ.get("PG_SLOW") != "1" or not PROXY.is_dir(),
                    reason="needs PG_SLOW=1 and ../shared/data/proxy (about 2 minutes)")
@pytest.mark.parametrize("vocab, compare", [
    (1024, ["fineweb_val_000000.bin", "fineweb_train_000000.bin"]),
    (8192, ["fineweb_val_000000.bin"]),  # the proxy ships no sp8192 train shard
])
def test_proxy_rebuild_is_byte_identical_to_the_shipped_shards(tmp_path, vocab, compare):
    prepare.build_dataset([PROXY / "docs_val.jsonl.gz", PROXY / "docs_train.jsonl.gz"], tmp_path / "ds",
                          tokenizer=SHARED / "tokenizers" / f"fineweb_{vocab}_bpe.model", val_docs=2500)
    for name in compare:
        assert (tmp_path / "ds" / name).read_bytes() == (PROXY / f"sp{vocab}" / name).read_bytes(), name


# --------------------------------------------------------------------------- leak-proof split


def test_a_build_whose_training_repeats_a_val_document_is_refused_naming_both(tmp_path, docs):
    leaky = docs[:20] + docs[40:60] + [docs[3]] + docs[60:80] + [docs[11]]
    with pytest.raises(prepare.PrepareError) as err:
        prepare.build_dataset(None, tmp_path / "ds", documents=leaky, val_docs=20, vocab_size=300)
    msg = str(err.value)
    assert msg.startswith("2 validation document(s) also appear in training")
    assert "val document 3 = train document 20" in msg and "val document 11 = train document 41" in msg
    assert not (tmp_path / "ds" / "manifest.json").exists()
    assert not prepare.shard_files(tmp_path / "ds")


def test_check_leak_passes_a_clean_dataset(built, capsys):
    folder, _ = built
    assert prepare.main(["--check-leak", str(folder)]) == 0
    assert "no validation document appears in training" in capsys.readouterr().out


def test_check_leak_names_the_val_documents_found_in_a_training_shard(built, tmp_path, capsys, docs):
    folder, _ = built
    copy = tmp_path / "leaky"
    shutil.copytree(folder, copy)
    val = split_docs(split_tokens(folder, "val"))
    last = prepare.shard_files(copy, "train")[-1]
    planted = np.concatenate([prepare.read_shard(last), [prepare.BOS_ID], val[7]])
    prepare.write_shard(last, planted)
    n_train = len(split_docs(split_tokens(folder, "train")))
    msg = cli_error(capsys, "--check-leak", copy)
    assert msg.startswith("error: 1 validation document(s) also appear in training")
    assert f"val document 7 = train document {n_train}" in msg
    assert _preview_of(docs[7]) in msg  # the document is shown decoded


def _preview_of(doc: str) -> str:
    return repr(doc[:20])[1:-1]


@pytest.mark.slow
@pytest.mark.skipif(not (PROXY / "sp1024").is_dir(), reason="needs ../shared/data/proxy")
def test_check_leak_passes_the_proxy(capsys):
    prepare.check_leak(PROXY / "sp1024")
    assert "2,500 val and 78,890 train documents" in capsys.readouterr().out
