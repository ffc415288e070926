"""Reading report text from a file or a folder, with one-line errors that name the file.

- ``.txt``: one report per line; blank lines are skipped.
- ``.jsonl``: one JSON object per line with a ``"text"`` field (other fields are kept by
  :func:`read_report_records`); blank lines are skipped.
- ``.csv``: a header row with a ``text`` column (comma-separated, quoted as Python's ``csv`` module / Excel write
  it; a UTF-8 byte-order mark is accepted).
- a folder: every ``*.txt`` file below it (sorted by relative path), one report per file (its whole text, surrounding
  whitespace stripped).

Files must be UTF-8. An empty source, a missing field or column, an empty report in a ``.jsonl`` / ``.csv`` row or a
``.txt`` file of a folder, a line that is not JSON or bytes that are not UTF-8 raise ``ValueError`` (a missing path
``FileNotFoundError``) with one line ``PATH: what is wrong``.

:func:`read_labelled_reports` reads labelled reports or sentences (a ``.jsonl`` / ``.csv`` with a ``label``), e.g. a
PubMed-20k-style sentence-classification set: labels may be class names or class indices.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["REPORT_SUFFIXES", "read_reports", "read_report_records", "read_labelled_reports"]

REPORT_SUFFIXES = (".txt", ".jsonl", ".csv")


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}, line {line}); "
            "save the reports as UTF-8"
        ) from None


def _jsonl(path: Path, field: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object with {field!r}")
        if field not in record:
            keys = ", ".join(map(repr, record)) or "none"
            raise ValueError(f"{path}: line {number} has no {field!r} field (fields: {keys})")
        if not isinstance(record[field], str) or not record[field].strip():
            raise ValueError(f"{path}: line {number} has an empty or non-string {field!r}")
        records.append(record)
    return records


def _csv(path: Path, field: str) -> list[dict[str, Any]]:
    text = _text(path)
    if not text.strip():
        return []
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = [c.strip() if c else c for c in (reader.fieldnames or [])]
        if field not in columns:
            shown = ", ".join(repr(c) for c in columns) or "none"
            raise ValueError(f"{path}: no {field!r} column in the header row (columns: {shown})")
        reader.fieldnames = columns
        records = []
        for row in reader:
            value = row.get(field)
            if value is None or not value.strip():
                raise ValueError(f"{path}: line {reader.line_num} has an empty {field!r} cell")
            records.append({k: v for k, v in row.items() if k is not None})
    except csv.Error as error:
        raise ValueError(f"{path}: not a readable CSV file ({error})") from None
    return records


def read_report_records(path: str | os.PathLike, field: str = "text") -> list[dict[str, Any]]:
    """The reports of ``path`` as dicts with at least ``field`` (a ``.jsonl`` object's other fields, a ``.csv`` row's
    other columns as strings, ``{"text", "path"}`` for a folder's files, ``{"text"}`` for a ``.txt`` line).

    Raises:
        FileNotFoundError, ValueError: one line naming the file (see the module docstring).
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such report file or folder")
    if source.is_dir():
        files = sorted(
            (p for p in source.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(source).as_posix()
        )
        if not files:
            raise ValueError(f"{source}: no .txt files in the report folder (one report per .txt file)")
        records = []
        for file in files:
            text = _text(file).strip()
            if not text:
                raise ValueError(f"{file}: empty report")
            records.append({field: text, "path": file.relative_to(source).as_posix()})
        return records
    suffix = source.suffix.lower()
    if suffix == ".txt":
        records = [{field: line.strip()} for line in _text(source).splitlines() if line.strip()]
    elif suffix == ".jsonl":
        records = _jsonl(source, field)
    elif suffix == ".csv":
        records = _csv(source, field)
    else:
        raise ValueError(
            f"{source}: unsupported report file type {source.suffix or '(no suffix)'!r}; use .txt (one report a "
            f"line), .jsonl (a {field!r} field), .csv (a {field!r} column) or a folder of .txt files"
        )
    if not records:
        raise ValueError(f"{source}: no reports (the file is empty)")
    return records


def read_reports(path: str | os.PathLike, field: str = "text") -> list[str]:
    """The report texts of a ``.txt`` / ``.jsonl`` / ``.csv`` file or a folder of ``.txt`` files, in file order."""
    return [str(record[field]) for record in read_report_records(path, field)]


def read_labelled_reports(
    path: str | os.PathLike,
    classes: Sequence[str] | None = None,
    field: str = "text",
    label_field: str = "label",
) -> tuple[list[dict[str, Any]], list[str]]:
    """Labelled reports of a ``.jsonl`` / ``.csv`` file: ``(records, classes)``, each record the file's fields with
    ``label`` an int index into ``classes``.

    A label is a class name or a class index (an int, or a string of digits as a CSV cell is). ``classes``: the class
    names in label order; default: the sorted distinct names when the labels are names, ``"0"``, ``"1"``, ... up to
    the largest index when they are indices.

    Raises:
        ValueError: one line naming the file and the report (1-based) without a label, or with a label that is not
        in ``classes`` / out of range, or a file that mixes names and indices.
    """
    source = Path(path)
    records = read_report_records(source, field)
    raw = []
    for number, record in enumerate(records, start=1):
        value = record.get(label_field)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"{source}: report {number} has no {label_field!r} (labelled reports need one each)")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{source}: report {number} has label {value!r}; use a class name or a class index")
        raw.append(value.strip() if isinstance(value, str) else value)
    numeric = [isinstance(v, int) or v.isdigit() for v in raw]
    if any(numeric) and not all(numeric) and classes is None:
        raise ValueError(f"{source}: the labels mix class names and class indices; use one kind, or pass the classes")
    if classes is None:
        if all(numeric):
            classes = [str(i) for i in range(max(int(v) for v in raw) + 1)]
        else:
            classes = sorted({str(v) for v in raw})
    names = [str(c) for c in classes]
    index = {name: i for i, name in enumerate(names)}
    out = []
    for number, (record, value) in enumerate(zip(records, raw), start=1):
        if isinstance(value, str) and value in index:
            label = index[value]
        elif isinstance(value, int) or value.isdigit():
            label = int(value)
            if not 0 <= label < len(names):
                raise ValueError(f"{source}: report {number} has label {label}, outside 0..{len(names) - 1}")
        else:
            raise ValueError(f"{source}: report {number} has label {value!r}, not one of {', '.join(names)}")
        out.append({**record, label_field: label})
    return out, names
