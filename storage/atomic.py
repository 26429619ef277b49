"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from storage.errors import RecordError
from storage.locations import StoragePath, as_path, location
from storage.locations.local import fsync_dir

__all__ = ["fsync_dir", "write_bytes_atomic", "create_exclusive", "json_safe"]


def write_bytes_atomic(path: StoragePath | str, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one whole: on disk
    through a temporary file in the same folder and a rename, on object storage as one PUT."""
    path = as_path(path)
    location(path).write_whole(path, data)


def create_exclusive(path: StoragePath | str, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists (a conditional PUT on object storage); True
    when this call (or a retry of it) created it."""
    path = as_path(path)
    return location(path).create_exclusive(path, data)


def json_safe(obj: Any) -> Any:
    """`obj` with every infinite float written as the text "inf" or "-inf": JSON has no Infinity
    (Python writes it, most readers refuse it); `float()` reads the text back as the same number.
    NaN is left as it is, for `allow_nan=False` to refuse: no NaN belongs in a record."""
    if isinstance(obj, float):
        return ("inf" if obj > 0 else "-inf") if obj in (float("inf"), float("-inf")) else obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj: Any) -> str:
    """Canonical JSON text (sorted keys, indented) so equal objects give equal bytes; standard JSON
    only (infinities as "inf" / "-inf", a NaN is a ValueError)."""
    return json.dumps(json_safe(obj), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def encode_text(text: str) -> bytes:
    """UTF-8 bytes of text that may hold file names with non-UTF-8 bytes (lone surrogates, as
    Python decodes them): each becomes the escape `\\udcXX`, which JSON reads back as the same
    character, so a name is kept exactly; in other text it shows the byte readably."""
    return text.encode("utf-8", "backslashreplace")


def readable(name: str) -> str:
    """A file or source name for people: a byte that is not UTF-8 shows as `\\xNN`."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as canonical JSON, atomically."""
    write_bytes_atomic(path, encode_text(dumps_json(obj)))


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write one compact JSON object a line, atomically."""
    # ASCII escapes keep file names with non-UTF-8 bytes (surrogates) round-tripping.
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    write_bytes_atomic(path, text.encode())


def read_json(path: Path) -> Any:
    """Read a JSON file, naming the file in the error when it is not valid JSON."""
    try:
        return json.loads(as_path(path).read_text())
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e})") from e


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file; an empty or missing file gives an empty list."""
    path = as_path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{n}: not valid JSON ({e})") from e
    return rows
