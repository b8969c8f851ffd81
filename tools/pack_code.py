"""Pack a training script into a smaller, self-extracting copy that runs the same program.

    python tools/pack_code.py train_gpt.py -o build/train_gpt.py

The copy is one line: it decompresses the script's source and executes it under the copy's own `__file__`, so
the code size the script measures (`os.path.getsize(__file__)`) and the source it embeds in its log are those
of the copy. Standard library only; the same input always gives the same bytes (with the same Python version:
`ast.unparse` may format differently across versions).
"""
import argparse
import ast
import base64
import lzma
import os
import re
import sys

# Measured on train_gpt.py (53 KB once stripped): .lzma ("alone") needs no container fields that xz's format
# carries (stream header, index, check), and lzma.decompress detects it by itself, so the loader stays short;
# pb=0 because source text has no 2/4/8-byte alignment for the position bits to model; a nice_len of 64
# came out a few bytes smaller than 273. 15,457 bytes, against 15,516 for preset 9e .lzma, 15,560 for preset 9e
# .xz and 15,520 for bz2 -9.
FILTERS = [{"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0, "nice_len": 64}]

# base85 is ASCII without quotes or backslashes, so it sits in a plain string literal, and its decoder is in the
# standard library. Measured on the same payload: base85 19,322 bytes, base64 20,612; a hand-written base-93
# decoder would give about 18,911, raw bytes escaped in a latin-1 source 15,902, but the latter makes the counted
# file (and every log that embeds it) non-UTF-8, and both put an unfamiliar decoder in front of reviewers.
# exec without its own globals runs the program in the loader's module: `__name__` stays "__main__" (so the
# final `main()` fires, under torchrun too, which starts each rank as a script) and every class's `__module__`
# is a real entry of sys.modules, which dataclasses needs to resolve string annotations. Compiling under
# `__file__` makes the code objects, and so tracebacks and torch.compile's logs, name the packed file.
LOADER = 'import lzma,base64;exec(compile(lzma.decompress(base64.b85decode("{}")),__file__,"exec"))\n'


class UserError(Exception):
    """Bad input: reported as one line, never as a traceback."""


def is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def strip_source(source: str, name: str) -> str:
    """The program without comments, docstrings, blank lines or 4-space indents.

    Working on the syntax tree rather than on tokens: a tree has no comments, so none can survive, and whether a
    string is a docstring is a fact of the tree, not a guess from the tokens around it. The output is parsed again
    and must give the very same tree, so whatever `ast.unparse` or the re-indentation does, the packed program is
    the same program (only line numbers differ).
    """
    try:
        tree = ast.parse(source, filename=name)
    except SyntaxError as e:
        raise UserError(f"{name} is not valid Python: {e.msg} (line {e.lineno})") from None
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            # Every bare string statement is dropped, not only the first: once a docstring is gone, the string
            # after it would become the new docstring.
            node.body = [stmt for stmt in body if not is_docstring(stmt)] or [ast.Pass()]
    text = ast.unparse(tree)
    # One space per level instead of four: about 5 KB less to compress, 1.5% off the result. Safe only because
    # unparse writes docstrings alone as multi-line strings (there are none left), and the check below holds.
    text = re.sub(r"(?m)^(?:    )+", lambda m: " " * (len(m.group(0)) // 4), text) + "\n"
    if ast.dump(ast.parse(text)) != ast.dump(tree):
        raise UserError(f"stripping {name} changed its syntax tree; cannot pack it safely")
    return text


def pack(source: str, name: str) -> bytes:
    payload = lzma.compress(strip_source(source, name).encode("utf-8"), format=lzma.FORMAT_ALONE, filters=FILTERS)
    return LOADER.format(base64.b85encode(payload).decode("ascii")).encode("ascii")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script", help="Python file to pack (e.g. train_gpt.py)")
    parser.add_argument("-o", "--output", required=True, help="where to write the packed copy")
    args = parser.parse_args(argv)
    try:
        try:
            with open(args.script, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise UserError(f"cannot read {args.script}: {e.strerror}") from None
        try:
            source = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{args.script} is not UTF-8 text") from None
        packed = pack(source, args.script)
        if os.path.exists(args.output) and os.path.samefile(args.script, args.output):
            raise UserError(f"refusing to overwrite the input {args.script} with its packed copy")
        try:
            with open(args.output, "wb") as f:
                f.write(packed)
        except OSError as e:
            raise UserError(f"cannot write {args.output}: {e.strerror}") from None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"pack_code: {args.script} {len(raw)} bytes -> {args.output} {len(packed)} bytes "
          f"({len(raw) / len(packed):.2f}x smaller)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
