"""The three text domains of the offline demo models, built from what every Python installation has.

* **prose**: the interactive help topics (``pydoc_data.topics``) and the docstrings of the standard
  library (read with ``ast``, nothing is imported);
* **code**: the standard library's own top-level ``.py`` sources;
* **data**: machine-readable records, one JSON object per line, of the Unicode character database
  (``unicodedata``: code point, character, name, category, bidirectional class and, where they exist,
  decomposition, numeric value, mirroring and case mappings). Neither prose nor code: upper-case names,
  hexadecimal code points, ``\\uXXXX`` escapes and the same keys over and over.

Every function returns a deterministic list of documents of about 1,500 characters, in a fixed order,
cut to ``max_chars`` characters in all. :func:`code_context_labels` marks, character by character, where
a code document is inside a string literal or inside brackets (the contextual variable the demo's
fine-tune is taught, :mod:`crosscoder.data.demo_pair`).
"""

from __future__ import annotations

import ast
import json
import re
import sysconfig
from pathlib import Path

DOMAINS = ("prose", "code", "data")
OPEN, CLOSE = "([{", ")]}"


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def prose_documents(max_chars: int) -> list[str]:
    """Help topics, then module/class/function docstrings longer than 80 characters."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    total = sum(len(d) for d in docs)
    for f in _stdlib_files():
        if total >= max_chars:
            break
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) > 80:
                    docs.append(d)
                    total += len(d)
    return _cap([c for d in docs for c in _paragraph_chunks(d)], max_chars)


def _paragraph_chunks(text: str, chunk_chars: int = 1500) -> list[str]:
    """Split at blank lines into pieces of about ``chunk_chars`` (a long paragraph stays whole)."""
    out, cur, size = [], [], 0
    for para in text.split("\n\n"):
        cur.append(para)
        size += len(para) + 2
        if size >= chunk_chars:
            out.append("\n\n".join(cur))
            cur, size = [], 0
    if cur and size > 80:
        out.append("\n\n".join(cur))
    return out


def code_documents(max_chars: int, chunk_chars: int = 1500) -> list[str]:
    """Standard-library sources cut at line boundaries into documents of about ``chunk_chars``."""
    docs: list[str] = []
    total = 0
    for f in _stdlib_files():
        if total >= max_chars:
            break
        try:
            lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        except (UnicodeDecodeError, OSError):
            continue
        chunks = _line_chunks(lines, chunk_chars)
        docs += chunks
        total += sum(len(d) for d in chunks)
    return _cap(docs, max_chars)


def _line_chunks(lines: list[str], chunk_chars: int) -> list[str]:
    docs, cur, size = [], [], 0
    for line in lines:
        cur.append(line)
        size += len(line)
        if size >= chunk_chars:
            docs.append("".join(cur))
            cur, size = [], 0
    if size > 80:
        docs.append("".join(cur))
    return docs


# Names made of a prefix and the code point ("CJK UNIFIED IDEOGRAPH-4E00") carry nothing; skipped.
_GENERIC = re.compile(r"-[0-9A-F]{4,6}$")


def _unicode_record(cp: int) -> str | None:
    import unicodedata

    c = chr(cp)
    name = unicodedata.name(c, "")
    if not name or _GENERIC.search(name) or name.startswith("HANGUL SYLLABLE"):
        return None
    rec: dict[str, object] = {
        "code": f"U+{cp:04X}",
        "char": c,
        "name": name,
        "category": unicodedata.category(c),
        "bidi": unicodedata.bidirectional(c),
    }
    if unicodedata.decomposition(c):
        rec["decomposition"] = unicodedata.decomposition(c)
    if unicodedata.numeric(c, None) is not None:
        rec["numeric"] = unicodedata.numeric(c)
    if unicodedata.mirrored(c):
        rec["mirrored"] = True
    for key, other in (("lower", c.lower()), ("upper", c.upper())):
        if other != c and len(other) == 1:
            rec[key] = f"U+{ord(other):04X}"
    return json.dumps(rec)


def data_documents(max_chars: int, chunk_chars: int = 1500) -> list[str]:
    """JSON-lines records of the named characters of Unicode planes 0-1, consecutive code points per
    document of about ``chunk_chars``; documents are taken evenly across the planes (every script gets
    some) up to ``max_chars``."""
    lines = [r + "\n" for cp in range(0x20000) if (r := _unicode_record(cp)) is not None]
    docs = _line_chunks(lines, chunk_chars)
    total = sum(len(d) for d in docs)
    stride = max(1, total // max(max_chars, 1))
    return _cap(docs[::stride], max_chars)


def _cap(docs: list[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        out.append(d)
        total += len(d)
    return out


def code_context_labels(text: str) -> tuple[list[bool], list[bool]]:
    """``(in_string, in_brackets)``: for every character of Python source ``text``, whether the scanner is
    inside a string literal / inside ``()``, ``[]`` or ``{}`` (depth > 0) **after** reading it.

    A small left-to-right scanner, not a parser (documents are cut from files at line boundaries, so one
    may start inside a docstring or a bracket): quotes ``'``, ``"``, ``'''`` and ``\"\"\"`` open and close
    string literals (a backslash escapes the next character; a single-quoted string also ends at a newline);
    ``#`` outside a string starts a comment up to the newline; brackets inside strings and comments do not
    count, and a closing bracket at depth 0 is ignored. A multi-character quote or an escape is labelled
    as a whole with the state after it: an opening quote is inside the string, a closing one outside.
    """
    in_string: list[bool] = []
    in_brackets: list[bool] = []
    depth, quote, comment, i, n = 0, "", False, 0, len(text)
    while i < n:
        ch, width = text[i], 1
        if quote:
            if ch == "\\":
                width = 2
            elif text.startswith(quote, i):
                width, quote = len(quote), ""
            elif ch == "\n" and len(quote) == 1:  # unterminated single-quoted string
                quote = ""
        elif comment:
            comment = ch != "\n"
        elif ch == "#":
            comment = True
        elif ch in "'\"":
            quote = ch * 3 if text.startswith(ch * 3, i) else ch
            width = len(quote)
        elif ch in OPEN:
            depth += 1
        elif ch in CLOSE:
            depth = max(0, depth - 1)
        width = min(width, n - i)
        in_string += [bool(quote)] * width
        in_brackets += [depth > 0] * width
        i += width
    return in_string, in_brackets
