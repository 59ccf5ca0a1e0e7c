"""Crash-safe file writing: atomic replace for whole files, an append-only CSV for row logs.

Long runs must never leave a half-written file or a broken CSV row behind, whatever
moment they are killed at. Whole files go to a temp file in the same folder and are
renamed over the target (atomic on POSIX). Row logs append each complete row with one
`write` call and, on reopening, drop a trailing partial line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class UnsafeFileId(ValueError):
    """A file id read from a file that is absolute or climbs out of its folder with `..`."""


def check_file_id(file_id: str, source: str | os.PathLike[str]) -> str:
    """`file_id` unchanged if it is a relative path that stays inside the folder it is joined to.

    File ids read from CSVs (labels.csv, metadata.csv, scores.csv, ...) are joined to input
    and output folders, so an edited or foreign CSV with `/etc/x.wav` or `../../x.wav` would
    read or write outside them. UnsafeFileId names the CSV (`source`) and the id. Both
    separators count (`\\` too), so a Windows-made id is judged the same way.
    """
    parts = file_id.replace("\\", "/").split("/")
    if not file_id.strip():
        reason = "is empty"
    elif file_id.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[/\\]", file_id):
        reason = "is an absolute path"
    elif ".." in parts:
        reason = "contains '..'"
    elif "\0" in file_id:
        reason = "contains a NUL character"
    else:
        return file_id
    raise UnsafeFileId(
        f"{source}: file id {file_id!r} {reason}; ids must be paths relative to their folder, "
        "inside it (fix or regenerate the CSV)"
    )


def check_file_ids(file_ids: Iterable[str], source: str | os.PathLike[str]) -> None:
    """check_file_id for every id of one CSV: the first unsafe one raises UnsafeFileId."""
    for file_id in file_ids:
        check_file_id(str(file_id), source)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, else delete it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Only a name is chosen here: the writer creates the file inside the try, so a Ctrl-C
    # at any moment (even during the create syscall) is cleaned up below.
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp{target.suffix}"
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def csv_text(
    columns: Sequence[str], rows: Iterable[Mapping[str, Any]], header: bool = True
) -> str:
    """Rows as CSV text (NaN as an empty cell), exactly as the writers here put it on disk."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="raise")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buf.getvalue()


def _cell(value: Any) -> Any:
    # NaN is written as an empty cell so pandas, spreadsheets and csv readers agree.
    if isinstance(value, float) and value != value:
        return ""
    return value


def write_csv_atomic(
    path: str | os.PathLike[str], columns: Sequence[str], rows: Iterable[Mapping[str, Any]]
) -> Path:
    """Write a whole CSV (header + rows) atomically."""
    return write_text_atomic(path, csv_text(columns, rows, header=True))


class RowLog:
    """An append-only CSV whose every row is either fully on disk or absent.

    Opening an existing log checks the header and drops a trailing partial line left by
    a kill. Each `append` is one `os.write` of whole lines followed by fsync, so a
    SIGKILL at any moment leaves the file parseable.
    """

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            self._repair()
        else:
            write_text_atomic(self.path, csv_text(self.columns, [], header=True))

    def _repair(self) -> None:
        data = self.path.read_bytes()
        header = data.split(b"\n", 1)[0].decode("utf-8")
        if next(csv.reader([header])) != self.columns:
            raise ValueError(
                f"{self.path}: columns {header!r} differ from the expected {self.columns}; "
                "it was written by another version or program (move it away or use --overwrite)"
            )
        if not data.endswith(b"\n"):
            with open(self.path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        text = csv_text(self.columns, rows, header=False)
        if not text:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, str]]:
        with open(self.path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
