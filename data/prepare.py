#!/usr/bin/env python3
"""Build or download datasets in the Parameter Golf shard format.

    python data/prepare.py --out DIR                          # offline demo (stdlib docstrings)
    python data/prepare.py --input PATH... --out DIR [--tokenizer MODEL | --vocab-size N]
                           [--val-docs N] [--shard-tokens N]  # your own text
    python data/prepare.py --variant sp1024 [--train-shards N] --out DIR   # published FineWeb export
    python data/prepare.py --inspect DIR                      # what will the model read?

A dataset folder holds fineweb_val_*.bin and fineweb_train_*.bin (256 x int32
little-endian header [20240520, 1, n_tokens, 0...], then n_tokens x uint16; every
document is [BOS=1] + ids, no EOS), tokenizer.model (+ tokenizer.vocab) and
manifest.json. train_gpt.py reads it unchanged: DATA_PATH=DIR TOKENIZER_PATH=DIR/tokenizer.model.

The offline paths need only the standard library, numpy and sentencepiece;
huggingface_hub is imported only for --variant.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import itertools
import json
import os
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

import caseops

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
BOS_ID = 1
MAX_VOCAB = 65535  # ids are stored as uint16
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_DOCS = 50_000  # the published export's val split
DEFAULT_VOCAB = 1024
DEFAULT_TRAIN_SHARDS = 80  # like the upstream downloader: 8B training tokens
# SentencePiece keeps every training sentence in memory; beyond this the
# tokenizer does not get noticeably better, only slower and bigger to train.
TOKENIZER_TRAIN_BYTES = 100_000_000
# The trainer records its thread count in the .model file, so a machine-dependent
# value would make trained tokenizers differ between machines.
TOKENIZER_TRAIN_THREADS = 2
ENCODE_BATCH_BYTES = 4_000_000
TMP_DIR = ".prepare-tmp"
# Written into TMP_DIR as it is made: a folder holding only our own leftovers (a build
# killed before its first manifest) is ours to resume; any other content is not.
TMP_MARK = "made-by-data-prepare.py"
MANIFEST = "manifest.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_VOCAB = "tokenizer.vocab"

DEMO_VAL_DOCS = 200
DEMO_SEED = 1337

REMOTE_ROOT = "datasets"
# sp1024 is the official export; sp4096/sp8192 were published by a competitor
# (used by the record submissions) with the same layout and manifest format.
VARIANT_REPOS = {
    "sp1024": "willdepueoai/parameter-golf",
    "sp4096": "kevclark/parameter-golf",
    "sp8192": "kevclark/parameter-golf",
    "sp8192_caseops": "romeerp/parameter-golf-caseops-v1",
}
# The CaseOps export (used by the records from #1729 on) publishes no manifest: its files
# are found by name, val shards and their byte sidecars counted until the first missing one.
CASEOPS_DATASET = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
CASEOPS_TOKENIZER = "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")


class PrepareError(Exception):
    """A user-facing problem; main() prints it as one line, never a traceback."""


class NoTrainingText(PrepareError):
    """The tokenizer trainer was given no text at all."""


# --------------------------------------------------------------------------- progress


class Progress:
    """A tiny stderr progress bar that stays silent for jobs shorter than `delay`
    seconds, so quick runs and test logs are not cluttered. On a terminal it
    redraws one line; in a log file it writes a line every 10 s."""

    def __init__(self, label: str, total: float | None = None, unit: str = "", scale: float = 1.0,
                 delay: float = 2.0, stream=None):
        self.label, self.total, self.unit, self.scale = label, total, unit, scale
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.delay = delay
        self.done = 0.0
        self.last_draw = 0.0
        self.shown = False

    def update(self, n: float = 1, absolute: float | None = None) -> None:
        self.done = absolute if absolute is not None else self.done + n
        now = time.monotonic()
        if now - self.start < self.delay or now - self.last_draw < (0.2 if self.tty else 10.0):
            return
        self.last_draw = now
        self._draw(now)

    def _fmt(self, x: float) -> str:
        return f"{x / self.scale:,.1f}" if self.scale != 1 else f"{int(x):,}"

    def _draw(self, now: float, final: bool = False) -> None:
        text = f"{self.label}: {self._fmt(self.done)}"
        if self.total:
            frac = min(1.0, self.done / self.total)
            text += f"/{self._fmt(self.total)}{self.unit} [{'#' * int(frac * 20):<20}] {frac:4.0%}"
        else:
            text += self.unit
        text += f" {now - self.start:.1f}s"
        self.stream.write(("\r" + text + ("\n" if final else "")) if self.tty else text + "\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown or time.monotonic() - self.start >= self.delay:
            self._draw(time.monotonic(), final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- shards


def shard_header(n_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, n_tokens
    return header.tobytes()


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    # A crash must never leave a half-written file under a name that train_gpt.py or a
    # resumed run would trust.
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shard(path: Path, tokens) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > 0xFFFF):
        raise PrepareError(f"{Path(path).name}: token ids must fit in uint16")
    atomic_write_bytes(Path(path), shard_header(tokens.size) + tokens.astype("<u2").tobytes())


def check_shard(path: Path) -> int:
    """Return the token count after checking what train_gpt.py checks: magic,
    version and that the size is exactly header + 2 bytes per token."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise PrepareError(f"cannot read shard {path}: {e.strerror}") from None
    if len(raw) < HEADER_BYTES:
        raise PrepareError(f"{path.name} is not a valid shard: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != SHARD_MAGIC:
        raise PrepareError(f"{path.name} is not a valid shard: magic {int(header[0])}, expected {SHARD_MAGIC}")
    if int(header[1]) != SHARD_VERSION:
        raise PrepareError(f"{path.name} is not a valid shard: version {int(header[1])}, expected {SHARD_VERSION}")
    n = int(header[2])
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise PrepareError(f"{path.name} is not a valid shard: header says {n} tokens "
                           f"({HEADER_BYTES + 2 * n} bytes) but the file has {size} bytes")
    return n


def read_shard(path: Path, mmap: bool = False) -> np.ndarray:
    n = check_shard(path)
    if mmap:
        return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
    return np.fromfile(path, dtype="<u2", count=n, offset=HEADER_BYTES)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def dataset_files(folder: Path) -> list[Path]:
    """Every shard of a dataset: the token shards of both splits and the CaseOps byte sidecars."""
    return shard_files(folder) + shard_files(folder, "val_bytes")


def shard_files(folder: Path, split: str | None = None) -> list[Path]:
    """Token shards of a split (both by default); split "val_bytes" gives the CaseOps byte sidecar,
    which shares the fineweb_val_ prefix but is not part of the val split."""
    splits = [split] if split else ["val", "train"]
    return [p for s in splits for p in sorted(Path(folder).glob(f"fineweb_{s}_[0-9]*.bin"))]


class ShardWriter:
    """Streams one split's tokens into fixed-size shards, so memory stays flat no matter
    how large the corpus is. Like the published export, a document may continue in
    the next shard. Shards go to `tmp_dir`; the caller moves them into place."""

    def __init__(self, tmp_dir: Path, split: str, shard_tokens: int):
        self.tmp_dir, self.split, self.shard_tokens = Path(tmp_dir), split, shard_tokens
        self.done: list[tuple[str, int]] = []
        self._f = None
        self._fill = 0

    def _open(self) -> None:
        name = f"fineweb_{self.split}_{len(self.done):06d}.bin"
        self._f = open(self.tmp_dir / name, "wb")
        self._f.write(shard_header(0))  # real count is patched in when the shard is closed
        self._name, self._fill = name, 0

    def _close_shard(self) -> None:
        self._f.seek(0)
        self._f.write(shard_header(self._fill))
        self._f.close()
        self.done.append((self._name, self._fill))
        self._f = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype("<u2", copy=False)
        pos = 0
        while pos < tokens.size:
            if self._f is None:
                self._open()
            take = min(self.shard_tokens - self._fill, tokens.size - pos)
            self._f.write(tokens[pos:pos + take].tobytes())
            self._fill += take
            pos += take
            if self._fill == self.shard_tokens:
                self._close_shard()

    def close(self) -> list[tuple[str, int]]:
        if self._f is not None:
            self._close_shard()
        return self.done

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# --------------------------------------------------------------------------- inputs


def _is_jsonl(path: Path) -> bool:
    return path.name.lower().endswith(JSONL_SUFFIXES)


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def expand_inputs(paths: Iterable) -> list[tuple[Path, str]]:
    """Turn the --input arguments into (file, kind) in reading order.

    kind is 'jsonl' (one document per line, `text` field), 'blocks' (a text file
    given directly: documents separated by blank lines) or 'whole' (a text file
    inside a given folder: the file is one document)."""
    files: list[tuple[Path, str]] = []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file() and not _is_hidden(f, p))
            if not inside:
                raise PrepareError(f"input folder {p} contains no files")
            files += [(f, "jsonl" if _is_jsonl(f) else "whole") for f in inside]
        elif p.is_file():
            files.append((p, "jsonl" if _is_jsonl(p) else "blocks"))
        else:
            raise PrepareError(f"input not found: {p}")
    if not files:
        raise PrepareError("no input given")
    return files


class _Reader:
    """Opens an input file as text and remembers how many on-disk bytes were consumed,
    which is the only progress measure that works for gzip and plain files alike."""

    def __init__(self, path: Path):
        self.path = path
        self.raw = open(path, "rb")
        stream = gzip.GzipFile(fileobj=self.raw, mode="rb") if path.name.lower().endswith(".gz") else self.raw
        self.text = io.TextIOWrapper(stream, encoding="utf-8", errors="strict")

    def consumed(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        self.text.close()
        self.raw.close()


def _decode_guard(path: Path, fn: Callable[[], Iterator[str]]) -> Iterator[str]:
    try:
        yield from fn()
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not UTF-8 text ({e.reason})") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise PrepareError(f"{path}: cannot read ({e})") from None


def _jsonl_docs(path: Path, reader: _Reader) -> Iterator[str]:
    for lineno, line in enumerate(reader.text, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise PrepareError(f'{path}:{lineno}: expected an object with a string "text" field')
        # Kept verbatim (even if empty) so document i of the shards is line i of the file.
        yield text


def _block_docs(reader: _Reader) -> Iterator[str]:
    lines: list[str] = []
    for line in reader.text:
        if line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines).removesuffix("\n")
            lines = []
    if lines:
        yield "".join(lines).removesuffix("\n")


def _whole_doc(reader: _Reader) -> Iterator[str]:
    text = reader.text.read()
    if text.strip():
        yield text.removesuffix("\n")


def iter_documents(files: list[tuple[Path, str]], on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """Yield documents in input order. `on_bytes(n)` gets the running count of input
    bytes read, for progress bars."""
    before = 0
    for path, kind in files:
        reader = _Reader(path)
        try:
            if kind == "jsonl":
                docs = lambda: _jsonl_docs(path, reader)  # noqa: E731
            elif kind == "blocks":
                docs = lambda: _block_docs(reader)  # noqa: E731
            else:
                docs = lambda: _whole_doc(reader)  # noqa: E731
            for doc in _decode_guard(path, docs):
                if on_bytes:
                    on_bytes(before + reader.consumed())
                yield doc
        finally:
            before += path.stat().st_size
            reader.close()
    if on_bytes:
        on_bytes(before)


def fingerprint_files(files: list[tuple[Path, str]]) -> str:
    # Hashing the raw bytes is cheap next to tokenizing them, and tells "the same
    # data again" from "different data" regardless of file names or working directory.
    h = hashlib.sha256()
    for path, kind in files:
        h.update(f"{kind}:{path.stat().st_size}:".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def fingerprint_texts(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


# --------------------------------------------------------------------------- demo corpus


def _stdlib_sources() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        for fn in filenames:
            if fn.endswith(".py"):
                rel = (Path(dirpath) / fn).relative_to(root).with_suffix("")
                parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
                if parts:
                    found.append((".".join(parts), Path(dirpath) / fn))
    return sorted(found)


def _docstring_sections(body: list, prefix: str) -> Iterator[str]:
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + node.name
            doc = ast.get_docstring(node)
            if doc:
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                yield f"{kind} {name}\n{doc}"
            if isinstance(node, ast.ClassDef):
                yield from _docstring_sections(node.body, name + ".")


def module_document(name: str, source: bytes) -> str | None:
    # Parsing instead of importing: importing the whole standard library has side
    # effects (antigravity opens a browser, `this` prints) and depends on the platform.
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc)
    parts += list(_docstring_sections(tree.body, ""))
    if not parts:
        return None
    return f"Module {name}\n\n" + "\n\n".join(parts)


def demo_documents() -> list[str]:
    """One document per standard-library module (its docstrings), in a fixed shuffled
    order so the val split is a fair sample; identical on every run of the same Python."""
    sources = _stdlib_sources()
    docs = []
    with Progress("reading stdlib docstrings", total=len(sources), unit=" modules") as bar:
        for name, path in sources:
            doc = module_document(name, path.read_bytes())
            if doc:
                docs.append(doc)
            bar.update()
    if not docs:
        raise PrepareError("found no standard-library docstrings to build the demo from "
                           "(is this Python installed without its .py sources?)")
    random.Random(DEMO_SEED).shuffle(docs)
    return docs


# --------------------------------------------------------------------------- tokenizer


def _spm():
    try:
        import sentencepiece
    except ImportError:
        raise PrepareError("sentencepiece is not installed: pip install sentencepiece") from None
    return sentencepiece


def check_vocab(sp, what: str) -> int:
    n = int(sp.vocab_size())
    if n > MAX_VOCAB:
        raise PrepareError(f"{what} has {n:,} tokens; shards store ids as uint16, so at most {MAX_VOCAB:,} are supported")
    if sp.bos_id() != BOS_ID:
        raise PrepareError(f"{what} has BOS id {sp.bos_id()}; the challenge format needs BOS = {BOS_ID}")
    return n


def load_tokenizer(model: Path | bytes, what: str = "tokenizer"):
    spm = _spm()
    if not isinstance(model, (bytes, bytearray)):
        model = _read_model(Path(model))
    if not model:
        # SentencePiece takes an empty proto as "no model" and then logs C++ warnings
        # on every call, so this must be caught before it is loaded.
        raise PrepareError(f"{what} is an empty file; pass a SentencePiece .model file")
    try:
        sp = spm.SentencePieceProcessor(model_proto=bytes(model))
    except (RuntimeError, OSError) as e:
        raise PrepareError(f"{what} is not a SentencePiece model ({str(e).splitlines()[0]})") from None
    check_vocab(sp, what)
    return sp


class _TrainingLines:
    """Feeds SentencePiece lines rather than whole documents: it skips "sentences"
    longer than max_sentence_length, which would silently drop most long documents.
    Counts what it fed, so an empty corpus gets our error rather than the trainer's, and
    keeps any input error, because the trainer swallows exceptions from its iterator."""

    def __init__(self, docs: Iterable[str], limit_bytes: int):
        self.docs, self.limit, self.lines = docs, limit_bytes, 0
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        used = 0
        try:
            for doc in self.docs:
                for line in doc.split("\n"):
                    if line.strip():
                        used += len(line.encode("utf-8"))
                        self.lines += 1
                        yield line
                if used >= self.limit:
                    return
        except Exception as e:  # noqa: BLE001 - re-raised by train_tokenizer
            self.error = e


def train_tokenizer(docs: Iterable[str], vocab_size: int, reserved: str = "") -> bytes:
    """Train a byte-fallback BPE (ids 0..3 = pad, BOS, EOS, unk like the official
    tokenizers) and return the .model bytes. Identity normalisation keeps every byte of
    the text, so decode(encode(text)) == text. Each character of `reserved` becomes a
    piece of its own (ids 4, 5, ...) that never merges with its neighbours."""
    spm = _spm()
    buf = io.BytesIO()
    lines = _TrainingLines(docs, TOKENIZER_TRAIN_BYTES)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            character_coverage=0.9995,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            user_defined_symbols=list(reserved),
            num_threads=TOKENIZER_TRAIN_THREADS,
            minloglevel=2,
        )
        if lines.error is not None:
            raise lines.error
    except RuntimeError as e:
        if lines.error is not None:
            raise lines.error
        if lines.lines == 0:
            raise NoTrainingText("the training documents contain no text to train a tokenizer on") from None
        raise PrepareError(f"tokenizer training failed: {str(e).strip().splitlines()[-1]}") from None
    return buf.getvalue()


def vocab_text(sp) -> str:
    # Same layout as SentencePiece's own .vocab: piece TAB score, one per id.
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))


def _sibling_vocab(model_path: Path) -> str | None:
    vocab = Path(model_path).with_suffix(".vocab")
    return vocab.read_text(encoding="utf-8") if vocab.is_file() else None


# --------------------------------------------------------------------------- output folder


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PrepareError(f"{path} is unreadable ({e}); delete it or choose another --out") from None


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_bytes(Path(folder) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def make_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} is a file, not a folder; give a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot create --out {out}: {e.strerror}") from None


def _only_our_leftovers(out: Path) -> bool:
    entries = list(out.iterdir())
    return all(e.name == TMP_DIR and (e / TMP_MARK).is_file() for e in entries)


def check_out_dir(out: Path, identity: dict, force: bool = False) -> None:
    """Refuse to write into a folder that holds another dataset: train_gpt.py globs every
    fineweb_*.bin in the folder, so a mix would be trained on silently. Refuse a non-empty
    folder this tool did not make too (unless `force`): a build replaces tokenizer.model
    and TMP_DIR, which may be someone else's."""
    old = read_manifest(out)
    if old is None:
        # Shards are refused even with force: a download keeps any valid shard already in
        # place, so it would mix someone else's tokens into the dataset.
        if dataset_files(out):
            raise PrepareError(f"{out} already holds fineweb_*.bin shards but no {MANIFEST}; "
                               "use an empty folder or delete those shards")
        if not force and not _only_our_leftovers(out):
            raise PrepareError(f"{out} is not empty and was not made by data/prepare.py (no {MANIFEST}); "
                               "use an empty folder, or pass --force to write into it anyway")
        return
    old_id = old.get("identity")
    if not isinstance(old_id, dict):
        if force:
            return
        raise PrepareError(f"{out}/{MANIFEST} was not written by data/prepare.py, so {out} was not made by "
                           "data/prepare.py; use an empty folder, or pass --force to write into it anyway")
    for key in sorted(set(old_id) | set(identity)):
        if old_id.get(key) != identity.get(key):
            raise PrepareError(f"{out} already holds a different dataset ({key}: {_short(old_id.get(key))} there, "
                               f"{_short(identity.get(key))} now); use another --out or delete it")


def _fresh_tmp(out: Path) -> Path:
    tmp = Path(out) / TMP_DIR
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted run
    tmp.mkdir(parents=True)
    (tmp / TMP_MARK).write_bytes(b"")
    return tmp


def _commit(out: Path, tmp: Path, names: list[str], manifest: dict) -> None:
    # Order matters for crash safety: the manifest naming this dataset goes first (so a
    # rerun recognises the folder), the final manifest last (so "complete" is true only
    # when every file is in place).
    write_manifest(out, {**manifest, "complete": False})
    for name in names:
        os.replace(tmp / name, out / name)
    keep = set(names)
    for stale in dataset_files(out):
        if stale.name not in keep:
            stale.unlink()
    write_manifest(out, manifest)
    shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- build


def _encode_batch(sp, texts: list[str], threads: int) -> np.ndarray:
    ids = sp.encode(texts, out_type=int, num_threads=threads)
    total = sum(len(x) for x in ids) + len(ids)
    flat = itertools.chain.from_iterable(itertools.chain((BOS_ID,), x) for x in ids)
    return np.fromiter(flat, dtype=np.int32, count=total)


def _batches(docs: Iterable[str], max_bytes: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a serialized protobuf message: varints as ints, everything
    else as bytes. Enough to read SentencePiece's output without the protobuf package."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        kind = key & 7
        if kind == 0:
            value, i = _varint(buf, i)
        elif kind == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif kind in (1, 5):
            value, i = buf[i:i + (8 if kind == 1 else 4)], i + (8 if kind == 1 else 4)
        else:
            raise PrepareError(f"unexpected protobuf wire type {kind} in SentencePiece output")
        yield key >> 3, value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def _encode_with_bytes(sp, texts: list[str], threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens ([BOS] + ids per CaseOps-transformed document) and, per token, the UTF-8 bytes of
    the original text it stands for (BOS 0). Each piece's surface (SentencePieceText.pieces:
    id = field 2, surface = field 3) is the span of the input it covers, whatever the
    tokenizer's normalisation does; a byte-fallback character's bytes go to its last piece."""
    ids, counts = [], []
    for blob in sp.encode(texts, out_type="serialized_proto", num_threads=threads):
        pieces = [dict(_proto_fields(v)) for f, v in _proto_fields(blob) if f == 2]
        ids += [BOS_ID] + [int(p.get(2, 0)) for p in pieces]
        counts += [0] + caseops.original_bytes(bytes(p.get(3, b"")).decode("utf-8") for p in pieces)
    toks, nbytes = np.array(ids, dtype=np.int32), np.array(counts, dtype=np.int64)
    if nbytes.size and int(nbytes.max()) > 0xFFFF:
        raise PrepareError(f"a token stands for {int(nbytes.max())} bytes, more than the uint16 byte sidecar holds")
    return toks, nbytes


def _doc_key(content: bytes) -> bytes | None:
    """What a document is compared by in the leak checks; None for an empty one, which has no content to leak."""
    return hashlib.blake2b(content, digest_size=16).digest() if content else None


def _preview(text: str, n: int = 50) -> str:
    return repr(text[:n] + ("..." if len(text) > n else ""))


def leak_error(pairs: list[tuple[int, int, str]], how: str, fix: str) -> PrepareError:
    shown = "; ".join(f"val document {v} = train document {t} ({_preview(text)})" for v, t, text in pairs[:5])
    more = f" and {len(pairs) - 5} more" if len(pairs) > 5 else ""
    return PrepareError(f"{len(pairs)} validation document(s) also appear in training ({how}): {shown}{more}; {fix}")


def encode_to_shards(sp, docs: Iterable[str], val_docs: int, tmp: Path, shard_tokens: int,
                     threads: int | None = None, transform: Callable[[str], str] | None = None) -> dict:
    """Tokenize documents in order: the first `val_docs` go to the val split, the rest
    to train. Returns per-split counts and the written (shard name, tokens). With a
    `transform` (CaseOps) documents are transformed before encoding and the val split gets
    a byte sidecar. Raises, writing nothing, if a val document reappears in training."""
    threads = threads or os.cpu_count() or 1
    vocab = int(sp.vocab_size())
    names = ["val", "train"] + (["val_bytes"] if transform else [])
    writers = {s: ShardWriter(tmp, s, shard_tokens) for s in names}
    stats = {s: {"docs": 0, "bytes": 0, "tokens": 0} for s in ("val", "train")}
    val_keys: dict[bytes, int] = {}
    leaks: list[tuple[int, int, str]] = []
    seen = 0
    try:
        for batch in _batches(docs, ENCODE_BATCH_BYTES):
            n_val = max(0, min(len(batch), val_docs - seen))
            for split, part in (("val", batch[:n_val]), ("train", batch[n_val:])):
                if not part:
                    continue
                st = stats[split]
                for i, doc in enumerate(part):
                    key = _doc_key(doc.encode("utf-8"))
                    if key and split == "val":
                        val_keys.setdefault(key, st["docs"] + i)
                    elif key in val_keys:
                        leaks.append((val_keys[key], st["docs"] + i, doc))
                texts = [transform(d) for d in part] if transform else part
                if transform and split == "val":
                    toks, nbytes = _encode_with_bytes(sp, texts, threads)
                    writers["val_bytes"].write(nbytes)
                    st["sidecar_bytes"] = st.get("sidecar_bytes", 0) + int(nbytes.sum())
                else:
                    toks = _encode_batch(sp, texts, threads)
                if toks.size and int(toks.max()) >= vocab:
                    raise PrepareError(f"tokenizer produced id {int(toks.max())} >= its vocab size {vocab}")
                writers[split].write(toks)
                st["docs"] += len(part)
                st["bytes"] += sum(len(t.encode("utf-8")) for t in part)
                st["tokens"] += int(toks.size)
            seen += len(batch)
        if leaks:
            raise leak_error(leaks, "same text", "remove the duplicates from the input")
        shards = [s for w in writers.values() for s in w.close()]
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return {"splits": stats, "shards": shards}


def _check_split_sizes(total: int, val_docs: int) -> None:
    if total == 0:
        raise PrepareError("the input contains no documents")
    if total <= val_docs:
        raise PrepareError(f"all {total:,} documents went to the val split (--val-docs {val_docs:,}); "
                           "lower --val-docs so some are left for training")


def _train_on(open_docs: Callable[[], Iterator[str]], val_docs: int, vocab_size: int, caseops_on: bool) -> bytes:
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for doc in open_docs():
            seen += 1
            yield doc

    try:
        train_docs = itertools.islice(counted(), val_docs, None)
        if caseops_on:
            return train_tokenizer(map(caseops.encode, train_docs), vocab_size, reserved=caseops.MARKERS)
        return train_tokenizer(train_docs, vocab_size)
    except NoTrainingText:
        if seen <= val_docs:  # the trainer saw the whole input: explain it in split terms
            _check_split_sizes(seen, val_docs)
        raise


def build_dataset(inputs: Iterable | None, out_dir: Path, *, tokenizer: Path | None = None,
                  vocab_size: int | None = None, val_docs: int = DEFAULT_VAL_DOCS,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, threads: int | None = None,
                  documents: list[str] | None = None, source=None, force: bool = False,
                  caseops_on: bool = False) -> dict:
    """Build a dataset folder from text files (`inputs`) or from an in-memory list of
    `documents`. With `tokenizer` the given SentencePiece model is used as is, otherwise
    a byte-fallback BPE of `vocab_size` is trained on the training documents. `force`
    writes into a non-empty folder that this tool did not make. `caseops_on` stores the
    CaseOps transform of every document (data/caseops.py), with the markers reserved in a
    trained tokenizer, plus the val byte sidecar."""
    out = Path(out_dir)
    if val_docs < 0:
        raise PrepareError("--val-docs must be >= 0")
    if shard_tokens <= 0:
        raise PrepareError("--shard-tokens must be positive")
    if tokenizer is not None and vocab_size is not None:
        raise PrepareError("give either --tokenizer or --vocab-size, not both")

    if documents is None:
        inputs = list(inputs or [])
        files = expand_inputs(inputs)
        content_id = fingerprint_files(files)
        source = source if source is not None else [str(p) for p in inputs]
        total_bytes = sum(p.stat().st_size for p, _ in files)

        def open_docs(bar: Progress | None = None) -> Iterator[str]:
            return iter_documents(files, on_bytes=(lambda n: bar.update(absolute=n)) if bar else None)
    else:
        content_id = fingerprint_texts(documents)
        total_bytes = sum(len(d) for d in documents)

        def open_docs(bar: Progress | None = None) -> Iterator[str]:
            done = 0
            for doc in documents:
                done += len(doc)
                if bar:
                    bar.update(absolute=done)
                yield doc

    if tokenizer is not None:
        model_bytes = _read_model(Path(tokenizer))
        sp = load_tokenizer(model_bytes, f"tokenizer {tokenizer}")
        vocab_file = _sibling_vocab(Path(tokenizer))
        tok_id = "sha256:" + hashlib.sha256(model_bytes).hexdigest()
        tok_source = str(tokenizer)
    else:
        vocab_size = DEFAULT_VOCAB if vocab_size is None else int(vocab_size)
        if vocab_size > MAX_VOCAB:
            raise PrepareError(f"--vocab-size {vocab_size:,} is too large; shards store ids as uint16, "
                               f"so at most {MAX_VOCAB:,} are supported")
        tok_id = f"trained-bpe:vocab={vocab_size}:byte-fallback:identity"
        tok_source = f"trained here: SentencePiece BPE, vocab {vocab_size}, byte fallback, identity normalisation"
        if caseops_on:
            tok_id += ":caseops"
            tok_source += ", on CaseOps text with its 4 markers reserved (ids 4-7)"
    if caseops_on and tokenizer is not None:
        _check_caseops_tokenizer(sp, str(tokenizer))

    identity = {"content_sha256": content_id, "tokenizer": tok_id, "val_docs": val_docs, "shard_tokens": shard_tokens}
    if caseops_on:  # only then, so folders built before CaseOps existed keep their identity
        identity["text_transform"] = caseops.NAME
    make_out_dir(out)
    check_out_dir(out, identity, force)
    tmp = _fresh_tmp(out)
    try:
        if tokenizer is None:
            note(f"training a {vocab_size}-token BPE tokenizer on the training documents ...")
            t0 = time.monotonic()
            model_bytes = _train_on(open_docs, val_docs, vocab_size, caseops_on)
            sp = load_tokenizer(model_bytes, "trained tokenizer")
            vocab_file = None
            note(f"tokenizer trained in {time.monotonic() - t0:.1f}s")
        atomic_write_bytes(tmp / TOKENIZER_MODEL, model_bytes)
        atomic_write_bytes(tmp / TOKENIZER_VOCAB, (vocab_file or vocab_text(sp)).encode("utf-8"))

        with Progress("tokenizing", total=total_bytes, unit=" MB", scale=1e6) as bar:
            result = encode_to_shards(sp, open_docs(bar), val_docs, tmp, shard_tokens, threads,
                                      caseops.encode if caseops_on else None)
        _check_split_sizes(result["splits"]["val"]["docs"] + result["splits"]["train"]["docs"], val_docs)
        val = result["splits"]["val"]
        if caseops_on and val["sidecar_bytes"] != val["bytes"]:
            note(f"note: the byte sidecar counts {val['sidecar_bytes']:,} of the val documents' {val['bytes']:,} bytes: "
                 "the tokenizer drops the rest (leading/trailing whitespace), so BPB does not count them")

        names = [name for name, _ in result["shards"]]
        manifest = {
            "tool": "data/prepare.py",
            "format": {"magic": SHARD_MAGIC, "version": SHARD_VERSION, "header_int32": HEADER_INTS,
                       "dtype": "uint16 little-endian", "document": "[BOS] + ids, no EOS"},
            "complete": True,
            "identity": identity,
            "source": source,
            "text_transform": caseops.NAME if caseops_on else "identity",
            "tokenizer": TOKENIZER_MODEL,
            "tokenizer_source": tok_source,
            "tokenizer_sha256": hashlib.sha256(model_bytes).hexdigest(),
            "vocab_size": int(sp.vocab_size()),
            "bos_id": BOS_ID,
            "val_docs": val_docs,
            "shard_tokens": shard_tokens,
            "splits": result["splits"],
            "shards": {name: {"tokens": n, "sha256": sha256_file(tmp / name)} for name, n in result["shards"]},
        }
        _commit(out, tmp, [TOKENIZER_MODEL, TOKENIZER_VOCAB] + names, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _check_caseops_tokenizer(sp, what: str) -> None:
    # A tokenizer without the markers as pieces of their own would merge them into words
    # (or byte-fall-back on them), so its pieces would mix case with content.
    pieces = {sp.id_to_piece(i) for i in range(sp.vocab_size())}
    missing = [f"U+{ord(m):04X}" for m in caseops.MARKERS if m not in pieces]
    if missing:
        raise PrepareError(f"{what} is not a CaseOps tokenizer: it has no piece for the marker(s) "
                           f"{', '.join(missing)}; train one with --caseops --vocab-size N")


def _read_model(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PrepareError(f"tokenizer not found: {path}") from None
    except OSError as e:
        raise PrepareError(f"cannot read tokenizer {path}: {e.strerror}") from None


def build_demo(out_dir: Path, *, tokenizer: Path | None = None, vocab_size: int | None = None,
               val_docs: int = DEMO_VAL_DOCS, shard_tokens: int = DEFAULT_SHARD_TOKENS,
               force: bool = False, caseops_on: bool = False) -> dict:
    """The offline default: a small dataset from the standard library's docstrings."""
    docs = demo_documents()
    source = (f"demo: docstrings of the Python {sys.version_info.major}.{sys.version_info.minor}."
              f"{sys.version_info.micro} standard library, one document per module ({len(docs)} modules)")
    return build_dataset(None, out_dir, documents=docs, source=source, tokenizer=tokenizer,
                         vocab_size=vocab_size, val_docs=val_docs, shard_tokens=shard_tokens, force=force,
                         caseops_on=caseops_on)


# --------------------------------------------------------------------------- download


def _hf():
    try:
        import huggingface_hub
    except ImportError:
        raise PrepareError("--variant needs huggingface_hub: pip install huggingface_hub") from None
    return huggingface_hub


def _fetch(hf, repo_id: str, remote: str, staging: Path, endpoint: str | None, revision: str | None,
           missing_ok: bool = False) -> Path | None:
    folder, _, name = remote.rpartition("/")
    try:
        path = hf.hf_hub_download(repo_id=repo_id, filename=name, subfolder=folder or None, repo_type="dataset",
                                  revision=revision, local_dir=staging, endpoint=endpoint)
    except hf.utils.EntryNotFoundError:
        if missing_ok:
            return None
        raise PrepareError(f"{remote} is not in {repo_id}") from None
    except Exception as e:  # noqa: BLE001 - any network/HTTP failure becomes one readable line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PrepareError(f"download of {remote} from {repo_id} failed: {type(e).__name__}: {msg}") from None
    return Path(path)


def _published_entry(published: dict, variant: str) -> tuple[dict, dict]:
    name = f"fineweb10B_{variant}"
    dataset = next((d for d in published.get("datasets", []) if d.get("name") == name), None)
    if dataset is None:
        raise PrepareError(f"the published manifest has no dataset {name}")
    tok = next((t for t in published.get("tokenizers", []) if t.get("name") == dataset.get("tokenizer_name")), None)
    if tok is None or not tok.get("model_path"):
        raise PrepareError(f"the published manifest has no tokenizer entry for {name}")
    return dataset, tok


def _verify_tokenizer(staged: Path, vocab_size: int | None) -> None:
    sp = load_tokenizer(staged, f"downloaded tokenizer {staged.name}")
    if vocab_size is not None and int(sp.vocab_size()) != int(vocab_size):
        raise PrepareError(f"downloaded tokenizer {staged.name} has {sp.vocab_size()} tokens, "
                           f"the published manifest says {vocab_size}")


def download_variant(variant: str, out_dir: Path, *, train_shards: int = DEFAULT_TRAIN_SHARDS,
                     repo_id: str | None = None, endpoint: str | None = None,
                     revision: str | None = None, force: bool = False) -> dict:
    """Fetch the published export: manifest, the full val split, the first `train_shards`
    train shards and the tokenizer. Good files already in `out_dir` are kept (that is
    how an interrupted run resumes); every new file is verified before it replaces
    anything, so a bad download can never clobber a good file."""
    if variant not in VARIANT_REPOS:
        raise PrepareError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANT_REPOS)}")
    if train_shards < 0:
        raise PrepareError("--train-shards must be >= 0")
    hf = _hf()
    repo_id = repo_id or os.environ.get("MATCHED_FINEWEB_REPO_ID") or VARIANT_REPOS[variant]
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    try:
        hf.utils.disable_progress_bars()  # ours counts files; two bars on one line garble each other
    except AttributeError:
        pass
    out = Path(out_dir)
    caseops_on = variant == "sp8192_caseops"
    dataset_dir = f"{REMOTE_ROOT}/datasets/{CASEOPS_DATASET if caseops_on else f'fineweb10B_{variant}'}"
    identity = {"source": f"hf://datasets/{repo_id}/{dataset_dir}", "revision": revision or "main"}
    make_out_dir(out)
    check_out_dir(out, identity, force)
    staging = _fresh_tmp(out)
    if caseops_on:
        try:
            return _download_caseops(hf, repo_id, dataset_dir, identity, out, staging, train_shards, endpoint,
                                     revision)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    try:
        published = _load_published_manifest(hf, repo_id, staging, endpoint, revision)
        dataset, tok = _published_entry(published, variant)
        stats = dataset.get("stats") or {}
        n_val, n_train_max = int(stats.get("files_val", 0)), int(stats.get("files_train", 0))
        if n_val <= 0:
            raise PrepareError(f"the published manifest lists no val shards for {variant}")
        if train_shards > n_train_max:
            raise PrepareError(f"{variant} has only {n_train_max} train shards on {repo_id}; asked for {train_shards}")

        base = {"tool": "data/prepare.py", "identity": identity, "source": identity["source"],
                "published": dataset}
        write_manifest(out, {**base, "complete": False})
        _download_tokenizer(hf, repo_id, tok, dataset.get("vocab_size"), out, staging, endpoint, revision)

        names = [f"fineweb_val_{i:06d}.bin" for i in range(n_val)] + \
                [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
        with Progress(f"downloading {variant}", total=len(names), unit=" files") as bar:
            for name in names:
                _download_shard(hf, repo_id, f"{dataset_dir}/{name}", out, staging, endpoint, revision)
                bar.update()
        manifest = _download_manifest(out, base, dataset, f"hf://datasets/{repo_id}/{REMOTE_ROOT}/{tok['model_path']}")
        write_manifest(out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _download_caseops(hf, repo_id, dataset_dir, identity, out, staging, train_shards, endpoint, revision) -> dict:
    base = {"tool": "data/prepare.py", "identity": identity, "source": identity["source"],
            "text_transform": caseops.NAME}
    write_manifest(out, {**base, "complete": False})
    tok = {"model_path": CASEOPS_TOKENIZER}
    _download_tokenizer(hf, repo_id, tok, None, out, staging, endpoint, revision)
    _check_caseops_tokenizer(load_tokenizer(out / TOKENIZER_MODEL), "the downloaded tokenizer")
    get = lambda name, missing_ok=False: _download_shard(  # noqa: E731
        hf, repo_id, f"{dataset_dir}/{name}", out, staging, endpoint, revision, missing_ok)
    with Progress("downloading sp8192_caseops", unit=" files") as bar:
        n_val = 0
        while get(f"fineweb_val_{n_val:06d}.bin", missing_ok=True):
            sidecar = f"fineweb_val_bytes_{n_val:06d}.bin"
            get(sidecar)
            if check_shard(out / sidecar) != check_shard(out / f"fineweb_val_{n_val:06d}.bin"):
                raise PrepareError(f"{sidecar} does not have one entry per token of fineweb_val_{n_val:06d}.bin")
            n_val += 1
            bar.update(2)
        if n_val == 0:
            raise PrepareError(f"{repo_id} has no {dataset_dir}/fineweb_val_000000.bin")
        for i in range(train_shards):
            if not get(f"fineweb_train_{i:06d}.bin", missing_ok=True):
                raise PrepareError(f"sp8192_caseops has only {i} train shards on {repo_id}; asked for {train_shards}")
            bar.update()
    manifest = _download_manifest(out, base, {}, f"hf://datasets/{repo_id}/{REMOTE_ROOT}/{CASEOPS_TOKENIZER}")
    write_manifest(out, manifest)
    return manifest


def _load_published_manifest(hf, repo_id, staging, endpoint, revision) -> dict:
    path = _fetch(hf, repo_id, f"{REMOTE_ROOT}/manifest.json", staging, endpoint, revision)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PrepareError(f"the published manifest of {repo_id} is not valid JSON ({e})") from None


def _download_tokenizer(hf, repo_id, tok, vocab_size, out, staging, endpoint, revision) -> None:
    # Always fetched (it is small), but only swapped in after it loads and has the
    # published vocab size.
    model = _fetch(hf, repo_id, f"{REMOTE_ROOT}/{tok['model_path']}", staging, endpoint, revision)
    _verify_tokenizer(model, vocab_size)
    vocab = None
    if tok.get("vocab_path"):
        vocab = _fetch(hf, repo_id, f"{REMOTE_ROOT}/{tok['vocab_path']}", staging, endpoint, revision)
    _place_upstream_copies(out, tok, model, vocab)
    os.replace(model, out / TOKENIZER_MODEL)
    if vocab is not None:
        os.replace(vocab, out / TOKENIZER_VOCAB)
    else:
        atomic_write_bytes(out / TOKENIZER_VOCAB, vocab_text(load_tokenizer(out / TOKENIZER_MODEL)).encode())


def _place_upstream_copies(out: Path, tok: dict, model: Path, vocab: Path | None) -> None:
    # train_gpt.py's default TOKENIZER_PATH follows upstream's layout
    # (data/datasets/fineweb10B_sp1024 + data/tokenizers/fineweb_1024_bpe.model); when --out
    # is in that layout, put the verified tokenizer there too so the defaults just work.
    out = out.resolve()
    if out.parent.name != "datasets" or not out.name.startswith("fineweb"):
        return
    tok_dir = out.parent.parent / "tokenizers"
    tok_dir.mkdir(parents=True, exist_ok=True)
    for staged, remote in ((model, tok.get("model_path")), (vocab, tok.get("vocab_path"))):
        if staged is not None and remote:
            atomic_write_bytes(tok_dir / Path(remote).name, staged.read_bytes())


def _download_shard(hf, repo_id, remote, out, staging, endpoint, revision, missing_ok: bool = False) -> bool:
    """Fetch one shard unless a good copy is there; False if it is missing and `missing_ok`."""
    target = out / remote.rpartition("/")[2]
    if target.exists():
        try:
            check_shard(target)
            return True  # a good copy from an earlier run: keep it, never re-download it
        except PrepareError:
            pass  # a damaged copy is replaced, but only by a verified one
    staged = _fetch(hf, repo_id, remote, staging, endpoint, revision, missing_ok)
    if staged is None:
        return False
    try:
        check_shard(staged)
    except PrepareError as e:
        staged.unlink(missing_ok=True)
        raise PrepareError(f"downloaded {e} (from {repo_id}); nothing was replaced") from None
    os.replace(staged, target)
    return True


def _download_manifest(out: Path, base: dict, dataset: dict, tok_source: str) -> dict:
    sp = load_tokenizer(out / TOKENIZER_MODEL)
    shards, splits = {}, {}
    files = dataset_files(out)
    with Progress("hashing shards", total=len(files), unit=" files") as bar:
        for path in files:
            shards[path.name] = {"tokens": check_shard(path), "sha256": sha256_file(path)}
            bar.update()
    stats = dataset.get("stats") or {}
    for split in ("val", "train"):
        names = [p.name for p in shard_files(out, split)]
        every = split == "val" or len(names) == int(stats.get("files_train", -1))
        splits[split] = {"docs": stats.get(f"docs_{split}") if every else None,
                         "bytes": None,  # the published export does not record text bytes
                         "tokens": sum(shards[n]["tokens"] for n in names), "shards": len(names)}
    sidecar = shard_files(out, "val_bytes")
    if sidecar:
        splits["val"]["sidecar_bytes"] = sum(int(read_shard(p, mmap=True).sum(dtype=np.int64)) for p in sidecar)
    return {**base, "complete": True, "tokenizer": TOKENIZER_MODEL,
            "tokenizer_source": tok_source,
            "tokenizer_sha256": sha256_file(out / TOKENIZER_MODEL),
            "vocab_size": int(sp.vocab_size()), "bos_id": BOS_ID,
            "splits": splits, "shards": shards}


# --------------------------------------------------------------------------- inspect


def _scan_ids(files: list[Path]) -> dict[str, tuple[int, int]]:
    """Per shard name: its (min, max) token id; (0, -1) for an empty shard."""
    ranges = {}
    total = sum(p.stat().st_size for p in files)
    with Progress("scanning token ids", total=total, unit=" MB", scale=1e6) as bar:
        done = 0
        for p in files:
            lo, hi = 0, -1
            toks = read_shard(p, mmap=True)
            for start in range(0, toks.size, 50_000_000):
                chunk = toks[start:start + 50_000_000]
                if chunk.size:
                    lo = int(chunk.min()) if hi < 0 else min(lo, int(chunk.min()))
                    hi = max(hi, int(chunk.max()))
                bar.update(absolute=done + HEADER_BYTES + 2 * (start + chunk.size))
            ranges[p.name] = (lo, hi)
            done += p.stat().st_size
            del toks
    return ranges


def _render_tokens(sp, toks: np.ndarray) -> str:
    # Split at BOS so the reader sees where documents start, as the model does. An id the
    # tokenizer does not have is shown as such: decoding it would raise.
    vocab = int(sp.vocab_size()) if sp else None
    pieces, current = [], []
    for t in toks.tolist():
        if vocab is not None and t >= vocab:
            if current:
                pieces.append(sp.decode(current))
            pieces.append(f"[id {t}?]")
            current = []
        elif t == BOS_ID:
            if current:
                pieces.append(sp.decode(current) if sp else " ".join(map(str, current)))
            pieces.append("[BOS]")
            current = []
        else:
            current.append(t)
    if current:
        pieces.append(sp.decode(current) if sp else " ".join(map(str, current)))
    return "".join(pieces)


def inspect_dataset(folder: Path, n_tokens: int = 300, tokenizer: Path | None = None, stream=None) -> dict:
    """Print shards, token counts, the id range and the first `n_tokens` val tokens
    decoded. Raises PrepareError (after printing) if a shard is malformed."""
    stream = stream or sys.stdout
    folder = Path(folder)
    if not folder.is_dir():
        raise PrepareError(f"not a folder: {folder}")
    files = shard_files(folder)
    if not files:
        raise PrepareError(f"{folder} holds no fineweb_val_*.bin / fineweb_train_*.bin shards")
    manifest = read_manifest(folder) or {}
    w = lambda s="": print(s, file=stream)  # noqa: E731
    w(f"dataset {folder}")
    if manifest:
        state = "complete" if manifest.get("complete") else "INCOMPLETE (a build or download was interrupted)"
        w(f"  source: {manifest.get('source')}\n  tokenizer: {manifest.get('tokenizer_source', manifest.get('tokenizer'))}"
          f"\n  vocab size: {manifest.get('vocab_size')}   manifest: {state}")
    else:
        w("  (no manifest.json)")
    listed = manifest.get("shards") or {}
    bad, counts, info = [], {"val": [0, 0], "train": [0, 0]}, {}
    w(f"  {'shard':<28}{'tokens':>15}{'MB':>10}")
    for p in files:
        try:
            n = check_shard(p)
        except PrepareError as e:
            bad.append(str(e))
            w(f"  {p.name:<28}{'BAD':>15}   {e}")
            continue
        flag = ""
        if p.name in listed and listed[p.name].get("tokens") != n:
            flag = f"   (manifest says {listed[p.name].get('tokens')})"
            bad.append(f"{p.name}: {n} tokens but the manifest says {listed[p.name].get('tokens')}")
        split = "val" if p.name.startswith("fineweb_val_") else "train"
        counts[split][0] += 1
        counts[split][1] += n
        info[p.name] = n
        w(f"  {p.name:<28}{n:>15,}{p.stat().st_size / 1e6:>10.1f}{flag}")
    for split, (k, n) in counts.items():
        w(f"  {split}: {k} shard(s), {n:,} tokens")
    good = [p for p in files if p.name in info]
    ranges = _scan_ids(good)
    lo = min((r[0] for r in ranges.values() if r[1] >= 0), default=0)
    hi = max((r[1] for r in ranges.values()), default=-1)

    tok_path = Path(tokenizer) if tokenizer else folder / TOKENIZER_MODEL
    sp = load_tokenizer(tok_path, f"tokenizer {tok_path}") if tokenizer or tok_path.is_file() else None
    # The tokenizer decides what an id means to train_gpt.py; the manifest only records it.
    vocab, vocab_from = ((int(sp.vocab_size()), str(tok_path)) if sp else
                         (manifest.get("vocab_size"), MANIFEST))
    w(f"  token ids: {lo} .. {hi}" + (f" (vocab size {vocab})" if vocab else ""))
    if vocab:
        for name, (_, top) in ranges.items():
            if top >= int(vocab):
                bad.append(f"{name}: token id {top} >= vocab size {vocab} of {vocab_from}")
    val = [p for p in good if p.name.startswith("fineweb_val_")]
    if val:
        head = read_shard(val[0])[:n_tokens]
        how = f"decoded with {tok_path}" if sp else "as ids (no tokenizer.model found)"
        w(f"\nfirst {head.size} val tokens, {how}:\n")
        w(_render_tokens(sp, head))
    if bad:
        raise PrepareError(f"{len(bad)} problem(s) found: " + "; ".join(bad))
    return {"shards": info, "min_id": lo, "max_id": hi}


# --------------------------------------------------------------------------- leak check


def _split_documents(files: list[Path]) -> Iterator[np.ndarray]:
    """The documents ([BOS] + ids) of a split's shards, in order; a document may continue
    into the next shard."""
    carry = np.zeros(0, np.uint16)
    for path in files:
        toks = np.concatenate((carry, read_shard(path)))
        starts = np.flatnonzero(toks == BOS_ID)
        if toks.size and (starts.size == 0 or starts[0] != 0):
            raise PrepareError(f"{path.name} does not start a document with BOS={BOS_ID} where one is due")
        for a, b in zip(starts[:-1], starts[1:]):
            yield toks[a:b]
        carry = toks[starts[-1]:] if starts.size else toks
    if carry.size:
        yield carry


def check_leak(folder: Path, stream=None) -> dict:
    """Refuse (PrepareError) a dataset in which a val document also appears in training.
    Documents are compared by their token sequences: the tokenizer is deterministic, so
    equal texts always give equal tokens, and this works on any dataset, a download or a
    CaseOps one included, without trusting its tokenizer to decode exactly."""
    stream = stream or sys.stdout
    folder = Path(folder)
    val, train = shard_files(folder, "val"), shard_files(folder, "train")
    if not val or not train:
        raise PrepareError(f"{folder} needs both fineweb_val_*.bin and fineweb_train_*.bin shards to check")
    keys: dict[bytes, int] = {}
    n_val = 0
    for n_val, doc in enumerate(_split_documents(val), 1):
        if key := _doc_key(doc[1:].tobytes()):  # the tokens after its BOS
            keys.setdefault(key, n_val - 1)
    pairs, n_train = [], 0
    with Progress("checking train documents", unit=" docs") as bar:
        for n_train, doc in enumerate(_split_documents(train), 1):
            key = _doc_key(doc[1:].tobytes())
            if key in keys:
                pairs.append((keys[key], n_train - 1, doc))
            bar.update()
    print(f"checked {folder}: {n_val:,} val and {n_train:,} train documents", file=stream)
    if pairs:
        text = _document_text(folder)
        pairs = [(v, t, text(doc[1:])) for v, t, doc in pairs]
        for v, t, doc in pairs:
            print(f"  leak: val document {v} = train document {t}: {_preview(doc, 70)}", file=stream)
        raise leak_error(pairs, "same tokens", "do not train on this dataset; rebuild it with data/prepare.py")
    print("  no validation document appears in training", file=stream)
    return {"val_docs": n_val, "train_docs": n_train}


def _document_text(folder: Path) -> Callable[[np.ndarray], str]:
    """How to show a document: decoded (and CaseOps undone) when the folder's tokenizer is
    there, else as ids."""
    tok = folder / TOKENIZER_MODEL
    if not tok.is_file():
        return lambda ids: " ".join(map(str, ids[:20].tolist()))
    sp = load_tokenizer(tok, f"tokenizer {tok}")
    transformed = (read_manifest(folder) or {}).get("text_transform") == caseops.NAME

    def show(ids: np.ndarray) -> str:
        text = sp.decode(ids.tolist())
        try:
            return caseops.decode(text) if transformed else text
        except caseops.CaseOpsError:
            return text
    return show


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="data/prepare.py",
        description="Build (offline) or download datasets in the Parameter Golf shard format. "
                    "With only --out, builds a small demo dataset from the Python standard library's docstrings.")
    p.add_argument("--out", type=Path, metavar="DIR", help="dataset folder to create or update")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--input", nargs="+", metavar="PATH",
                      help="text files/folders, .jsonl or .jsonl.gz with a 'text' field; read in the order given")
    mode.add_argument("--variant", choices=sorted(VARIANT_REPOS), help="download the published FineWeb export")
    mode.add_argument("--inspect", type=Path, metavar="DIR", help="describe a dataset folder and decode its start")
    mode.add_argument("--check-leak", type=Path, metavar="DIR",
                      help="fail if any val document of the dataset in DIR also appears in its training split")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", type=Path, metavar="MODEL", help="existing SentencePiece .model to use")
    tok.add_argument("--vocab-size", type=int, metavar="N",
                     help=f"train a byte-fallback BPE of N tokens (default {DEFAULT_VOCAB})")
    p.add_argument("--caseops", action="store_true",
                   help="store CaseOps-transformed text (capitalisation as marker tokens) plus the val byte sidecar; "
                        "a trained tokenizer reserves the markers, a --tokenizer must have them")
    p.add_argument("--val-docs", type=int, metavar="N",
                   help=f"the first N documents form the val split (default {DEFAULT_VAL_DOCS:,}; demo {DEMO_VAL_DOCS})")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS, metavar="N",
                   help=f"with --variant: how many train shards to fetch (default {DEFAULT_TRAIN_SHARDS})")
    p.add_argument("--repo-id", help="with --variant: Hugging Face dataset repo to use instead of the default")
    p.add_argument("--tokens", type=int, default=300, metavar="N", help="with --inspect: how many val tokens to decode")
    p.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: all cores)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out that data/prepare.py did not make (replacing its "
                        "tokenizer.model, tokenizer.vocab, manifest.json and .prepare-tmp/)")
    return p


def _summary(manifest: dict, out: Path, seconds: float) -> str:
    sp = manifest["splits"]
    fmt = lambda s: f"{s['docs']:,} docs / {s['tokens']:,} tokens" if s.get("docs") is not None else f"{s['tokens']:,} tokens"  # noqa: E731
    return (f"wrote {out}: val {fmt(sp['val'])}, train {fmt(sp['train'])}, "
            f"{len(manifest['shards'])} shard(s), vocab {manifest['vocab_size']}, {seconds:.1f}s\n"
            f"use: DATA_PATH={out} TOKENIZER_PATH={out / TOKENIZER_MODEL} VOCAB_SIZE={manifest['vocab_size']}")


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    if args.inspect is not None:
        inspect_dataset(args.inspect, n_tokens=args.tokens, tokenizer=args.tokenizer)
        return 0
    if args.check_leak is not None:
        check_leak(args.check_leak)
        return 0
    if args.out is None:
        raise PrepareError("--out DIR is required")
    if args.variant:
        if args.tokenizer or args.vocab_size or args.val_docs is not None or args.caseops:
            raise PrepareError("--variant downloads a fixed export; --tokenizer/--vocab-size/--val-docs/--caseops "
                               "do not apply (the CaseOps export is --variant sp8192_caseops)")
        manifest = download_variant(args.variant, args.out, train_shards=args.train_shards, repo_id=args.repo_id,
                                    force=args.force)
    elif args.input:
        val_docs = DEFAULT_VAL_DOCS if args.val_docs is None else args.val_docs
        manifest = build_dataset(args.input, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                                 val_docs=val_docs, shard_tokens=args.shard_tokens, threads=args.threads,
                                 force=args.force, caseops_on=args.caseops)
    else:
        val_docs = DEMO_VAL_DOCS if args.val_docs is None else args.val_docs
        manifest = build_demo(args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                              val_docs=val_docs, shard_tokens=args.shard_tokens, force=args.force,
                              caseops_on=args.caseops)
    print(_summary(manifest, args.out, time.monotonic() - t0))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
