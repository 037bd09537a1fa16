"""Input readers shared by the reference runner and the exporter; the Rust CLI follows the same rules.

Texts (`read_texts`), chosen by the file name's extension, never by sniffing the content:

- `.jsonl` or `.ndjson`: JSON lines. Every non-blank line must be a JSON object whose `field`
  (default `text`) is a string; that string is the text. Blank lines (only whitespace) are skipped.
- anything else: plain text, one text per line. Lines end at `\\n`; a `\\r` before it is dropped; a
  final newline does not make an extra empty text. Every other line is kept as it is, including
  empty lines in the middle (an empty text is a valid input).

Files are UTF-8 (a leading byte-order mark is dropped). Errors name the file and the 1-based line.

Few-shot examples (`read_examples`): a JSON list of objects (the format of
`tests/data/flagembedding-icl-examples/MTEB/*.json`), or JSON lines of objects when the name ends
in `.jsonl`/`.ndjson`. Each object has string `query` and `response` and an optional string
`instruct`; other keys are ignored. Errors name the file and the 0-based entry index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")


def is_json_lines(path: str | Path) -> bool:
    """Whether `path` names a JSON-lines file (by extension, case-insensitive)."""
    return Path(path).suffix.lower() in JSON_LINES_SUFFIXES


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """The texts of an input file, in file order (see the module docs for the rules)."""
    content = _read_utf8(path)
    if is_json_lines(path):
        return [_text_field(obj, field, path, number) for number, obj in _json_lines(content, path)]
    return split_lines(content)


def split_lines(content: str) -> list[str]:
    """One text per line: `\\n` ends a line, a `\\r` before it is dropped, no text after a final newline."""
    if not content:
        return []
    lines = content.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_examples(path: str | Path) -> list[dict[str, str]]:
    """Few-shot examples as `{"query", "response"[, "instruct"]}` dicts, in file order."""
    content = _read_utf8(path)
    if is_json_lines(path):
        entries: list[Any] = [obj for _, obj in _json_lines(content, path)]
    else:
        try:
            entries = json.loads(content)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from err
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a JSON list of examples, found {type(entries).__name__}")
    return [_example(entry, path, index) for index, entry in enumerate(entries)]


def _read_utf8(path: str | Path) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 at byte {err.start}") from err


def _json_lines(content: str, path: str | Path) -> list[tuple[int, Any]]:
    """(1-based line number, parsed object) for each non-blank line; every one must be an object."""
    rows = []
    for number, line in enumerate(split_lines(content), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON: {err}") from err
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, found {type(obj).__name__}")
        rows.append((number, obj))
    return rows


def _text_field(obj: dict[str, Any], field: str, path: str | Path, number: int) -> str:
    if field not in obj:
        raise ValueError(f"{path}:{number}: no field {field!r}")
    value = obj[field]
    if not isinstance(value, str):
        raise ValueError(f"{path}:{number}: field {field!r} is {type(value).__name__}, expected a string")
    return value


def _example(entry: Any, path: str | Path, index: int) -> dict[str, str]:
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: example {index}: expected an object, found {type(entry).__name__}")
    example = {}
    for key in ("query", "response", "instruct"):
        if key not in entry:
            if key == "instruct":
                continue
            raise ValueError(f"{path}: example {index}: missing {key!r}")
        if not isinstance(entry[key], str):
            raise ValueError(f"{path}: example {index}: {key!r} is {type(entry[key]).__name__}, expected a string")
        example[key] = entry[key]
    return example
