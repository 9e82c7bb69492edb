"""Read labelled text from CSV/TSV files for training and evaluation, with clear errors."""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from typing import Optional

_INT = re.compile(r"^-?\d+$")
_FLOAT = re.compile(r"^-?\d*\.\d+([eE][-+]?\d+)?$|^-?\d+[eE][-+]?\d+$")


class DataError(ValueError):
    """Bad training/evaluation input; the CLIs print it and exit non-zero."""


@dataclass
class Example:
    text: str
    pair: Optional[str]
    label: str  # raw label cell


def read_examples(path: str, text_col: str, label_col: str, pair_col: Optional[str] = None,
                  limit: Optional[int] = None) -> list[Example]:
    """text_col may join several columns with '+', e.g. 'title+description' (joined by a space)."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    if os.path.getsize(path) == 0:
        raise DataError(f"data file {path} is empty")
    tsv = path.endswith((".tsv", ".tab"))
    with open(path, newline="", encoding="utf-8") as fh:
        reader = (csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.DictReader(fh))
        header = reader.fieldnames or []
        text_cols = text_col.split("+")
        needed = text_cols + [label_col] + ([pair_col] if pair_col else [])
        missing = [c for c in needed if c not in header]
        if missing:
            raise DataError(f"{path}: column(s) {', '.join(missing)} not found; the file has: {', '.join(header) or 'no header'}")
        out = []
        for row in reader:
            text = " ".join((row[c] or "").strip() for c in text_cols).replace("\\n", " ").strip()
            out.append(Example(text, (row[pair_col] or "").strip() if pair_col else None, (row[label_col] or "").strip()))
            if limit and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{path} has a header but no data rows")
    return out


def label_kind(values: list[str]) -> str:
    """'int' when every label is an integer, 'str' when they are names; floats or blanks are refused."""
    if any(v == "" for v in values):
        raise DataError("some rows have an empty label; every row needs one")
    if all(_INT.match(v) for v in values):
        return "int"
    floats = [v for v in values if _FLOAT.match(v)]
    if floats:
        raise DataError(f"labels must be integers or strings; found numeric non-integer labels such as {floats[0]!r}")
    return "str"
