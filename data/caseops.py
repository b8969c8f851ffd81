"""CaseOps: a reversible text transform that moves capitalisation into marker characters.

A tokenizer trained on the transformed text no longer needs separate pieces for
"the", "The" and "THE". Capitalisation is carried by four private-use characters:

    TITLE   U+E001  the next word starts with a capital        "Golf"  -> TITLE golf
    ALLCAPS U+E002  the next word is all capitals (2+ letters) "BPB"   -> ALLCAPS bpb
    CAPNEXT U+E003  the next letter is a capital (inside words) "iPhone" -> i CAPNEXT phone
    ESC     U+E004  the next character is a literal marker      U+E001 -> ESC U+E001

A word is a maximal run of ASCII letters. Only ASCII letters change case: the Unicode
case mappings are not one-to-one ("ß".upper() is "SS", "İ".lower() is two characters),
so letters outside ASCII are kept as they are, and the transform stays exactly
invertible for every string. This is the published `lossless_caps_caseops_v1` scheme,
so our output, encoded with the records' CaseOps tokenizer, gives their token stream.

Every character of the transformed text is either a marker (no bytes of the original)
or stands for itself in the original, with the same UTF-8 length (a lowercased ASCII
letter is one byte like its capital). That is what makes the byte sidecar exact.
"""

from __future__ import annotations

import re
from typing import Iterable

NAME = "lossless_caps_caseops_v1"  # the name the records give this scheme
TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
MARKERS = TITLE + ALLCAPS + CAPNEXT + ESC
MARKER_BYTES = 3  # every marker is a 3-byte UTF-8 character

_WORD_OR_MARKER = re.compile(r"[A-Za-z]+|[\ue001-\ue004]")
# One capitalised unit of the transformed text, or a marker that cannot belong there.
_CAPITALISED = re.compile(r"\ue004([\ue001-\ue004])|\ue002([a-z]+)|[\ue001\ue003]([a-z])|([\ue001-\ue004])")


class CaseOpsError(ValueError):
    """Text that no original text transforms to (a marker out of place)."""


def _encode_word(word: str) -> str:
    if word.islower():
        return word
    low = word.lower()
    if len(word) > 1 and word.isupper():
        return ALLCAPS + low
    head = (TITLE if word[0].isupper() else "") + low[0]
    return head + "".join(CAPNEXT + c if c != o else c for c, o in zip(low[1:], word[1:]))


def _encode_match(m: re.Match) -> str:
    s = m[0]
    return ESC + s if s in MARKERS else _encode_word(s)


def encode(text: str) -> str:
    """The transformed text: lowercase ASCII letters plus markers."""
    return _WORD_OR_MARKER.sub(_encode_match, text)


def _decode_match(m: re.Match) -> str:
    literal, shouted, capital, stray = m.groups()
    if stray is not None:
        raise CaseOpsError(f"marker U+{ord(stray):04X} at offset {m.start()} is not followed by what it marks")
    return literal or (shouted or capital).upper()


def decode(text: str) -> str:
    """The original text of `encode`'s output; CaseOpsError for text `encode` cannot produce."""
    return _CAPITALISED.sub(_decode_match, text)


def original_bytes(pieces: Iterable[str]) -> list[int]:
    """Per piece of transformed text (consecutive pieces, as a tokenizer cut it): the UTF-8
    bytes of the original text it stands for. Markers count 0, an escaped marker counts
    as the character it is; everything else counts its own UTF-8 length."""
    counts, escaped = [], False
    for piece in pieces:
        n = len(piece.encode("utf-8"))
        if any(m in piece for m in MARKERS):
            for ch in piece:
                if ch in MARKERS and not escaped:
                    n -= MARKER_BYTES
                    escaped = ch == ESC
                else:
                    escaped = False
        else:
            escaped = escaped and not piece  # an empty piece does not consume the escape
        counts.append(n)
    return counts
