"""The labels file: JSON lines, one record per image, written so that a crash never loses finished work.

    {"id": str, "class": str, "answer": str | null, "attribute": str | null, "model": str | null}
    read_labels / write_labels / validate_record / attributes_by_id; later lines win when an id repeats.

How the file is written (resumability). label_images APPENDS each finished batch (one write of whole lines,
then flush + fsync) instead of rewriting the whole file per batch: earlier bytes are never touched, so a crash
can at worst leave a partial last line, and a full rewrite per batch would cost O(n^2) I/O on large datasets
(16k images, batch 8 -> 2,000 rewrites of a growing file). read_labels drops a partial last line with a
warning; before appending again, label_images repairs such a file with one atomic rewrite (write_labels:
temporary file in the same folder, fsync, os.replace), so a partial line never ends up in the middle.
Only JSON is parsed: loading a labels file never executes code. One writer per file at a time.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterable

from .._io import atomic_write_bytes

__all__ = ["FIELDS", "LabelsFileError", "validate_record", "read_labels", "write_labels", "attributes_by_id",
           "scan_labels", "append_records"]

FIELDS = ("id", "class", "answer", "attribute", "model")


class LabelsFileError(ValueError):
    """A labels file (or a record) that does not follow the format; the message names file and line."""


def validate_record(obj, where: str = "record") -> dict:
    """Check one labels-file record (a dict with FIELDS; extra keys kept) and return it; LabelsFileError if not."""
    if not isinstance(obj, dict):
        raise LabelsFileError(f"{where}: expected a JSON object with fields {list(FIELDS)}, got {type(obj).__name__}")
    missing = [f for f in FIELDS if f not in obj]
    if missing:
        raise LabelsFileError(f"{where}: missing field(s) {missing} (need {list(FIELDS)})")
    if not isinstance(obj["id"], str) or not obj["id"]:
        raise LabelsFileError(f"{where}: 'id' must be a non-empty string, got {obj['id']!r}")
    if not isinstance(obj["class"], str) or not obj["class"].strip():
        raise LabelsFileError(f"{where}: 'class' must be a non-empty string, got {obj['class']!r}")
    for f in ("answer", "model"):
        if obj[f] is not None and not isinstance(obj[f], str):
            raise LabelsFileError(f"{where}: '{f}' must be a string or null, got {obj[f]!r}")
    a = obj["attribute"]
    if a is not None and (not isinstance(a, str) or not a.strip()):
        raise LabelsFileError(f"{where}: 'attribute' must be a non-empty string or null, got {a!r}")
    return obj


def scan_labels(path: Path) -> tuple[dict[str, dict], bool]:
    """(records by id, whether the file needs a repair before appending: partial or unterminated last line)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete = data.endswith(b"\n") or not data
    if complete:
        lines = lines[:-1]  # the empty piece after the final newline
    records: dict[str, dict] = {}
    repair = not complete
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        last = i == len(lines)
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if last and not complete:
                warnings.warn(f"{path}:{i}: dropping a truncated last line (an interrupted write?): "
                              f"{raw[:60].decode('utf-8', 'replace')!r}", stacklevel=3)
                break
            raise LabelsFileError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        rec = validate_record(obj, f"{path}:{i}")
        records[rec["id"]] = rec
    return records, repair


def read_labels(path: str | os.PathLike) -> dict[str, dict]:
    """Records of a labels file by image id (later lines win). Tolerates a truncated last line (warns)."""
    return scan_labels(Path(path))[0]


def write_labels(path: str | os.PathLike, records: Iterable[dict] | dict[str, dict]) -> None:
    """Write a labels file atomically: temporary file in the same folder, fsync, os.replace."""
    path = Path(path)
    recs = list(records.values()) if isinstance(records, dict) else list(records)
    for j, r in enumerate(recs):
        validate_record(r, f"record {j}")
    atomic_write_bytes(path, "".join(_line(r) for r in recs).encode("utf-8"))


def attributes_by_id(records: dict[str, dict]) -> dict[str, str | None]:
    """{image id: attribute word or None} from read_labels' result."""
    return {k: r["attribute"] for k, r in records.items()}


def _line(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


def append_records(path: Path, recs: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(_line(r) for r in recs))
        f.flush()
        os.fsync(f.fileno())
