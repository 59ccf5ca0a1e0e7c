"""Crash-safe files: atomic replace, whole CSVs, and the append-only RowLog."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from serec.fileio import RowLog, atomic_path, write_csv_atomic, write_json_atomic

COLUMNS = ["file", "score", "status"]


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt, SystemExit])
def test_atomic_path_renames_on_success_and_cleans_up_on_error(
    tmp_path: Path, interruption: type[BaseException]
) -> None:
    target = tmp_path / "deep" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and not tmp.exists()  # the writer creates it
        tmp.write_text("done")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_text() == "done"

    with pytest.raises(interruption), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise interruption("killed mid-write")
    assert target.read_text() == "done"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_write_csv_and_json_atomic(tmp_path: Path) -> None:
    rows = [{"file": "a.wav", "score": 1.5, "status": "ok"},
            {"file": "b,c.wav", "score": float("nan"), "status": "error"}]
    write_csv_atomic(tmp_path / "t.csv", COLUMNS, rows)
    with open(tmp_path / "t.csv", newline="") as fh:
        read = list(csv.DictReader(fh))
    assert read == [{"file": "a.wav", "score": "1.5", "status": "ok"},
                    {"file": "b,c.wav", "score": "", "status": "error"}]
    write_json_atomic(tmp_path / "r.json", {"path": tmp_path, "n": 2})
    assert json.loads((tmp_path / "r.json").read_text()) == {"path": str(tmp_path), "n": 2}


def test_rowlog_appends_and_survives_reopening(tmp_path: Path) -> None:
    log = RowLog(tmp_path / "log.csv", COLUMNS)
    log.append([{"file": "a.wav", "score": 1.0, "status": "ok"}])
    log.append([])
    log.append([{"file": "b.wav", "score": float("nan"), "status": "error"}])
    reopened = RowLog(tmp_path / "log.csv", COLUMNS)
    assert reopened.read() == [{"file": "a.wav", "score": "1.0", "status": "ok"},
                               {"file": "b.wav", "score": "", "status": "error"}]


def test_rowlog_drops_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    RowLog(path, COLUMNS).append([{"file": "a.wav", "score": 1.0, "status": "ok"}])
    with open(path, "ab") as fh:  # what a kill in the middle of a write leaves
        fh.write(b"b.wav,0.")
    log = RowLog(path, COLUMNS)
    assert [row["file"] for row in log.read()] == ["a.wav"]
    log.append([{"file": "b.wav", "score": 0.5, "status": "ok"}])
    assert [row["file"] for row in RowLog(path, COLUMNS).read()] == ["a.wav", "b.wav"]
    assert path.read_text().count("\n") == 3


def test_rowlog_refuses_a_file_with_other_columns(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("file,other\nx,1\n")
    with pytest.raises(ValueError, match="columns"):
        RowLog(path, COLUMNS)
    assert path.read_text() == "file,other\nx,1\n"
