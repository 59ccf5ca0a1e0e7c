"""One run per output folder: a lock file naming its holder (pid, host, start time, command).

Two runs writing into one folder would compute everything twice and, worse, drop each
other's rows when one rewrites a shared CSV. A step holds `OUTPUT/.serec.lock` for its
whole run. The file is created with O_EXCL and also flock()ed, so the kernel frees the
lock of a process that dies however it dies: a lock file left by a dead process of this
host is taken over, with a note. A lock held by a process of another host is refused (its
liveness cannot be checked from here); the message says which file to remove once that
run is known to be gone. The lock is re-entrant within a process, so a step called from
another step that holds the same folder runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = ".serec.lock"

# Folders this process holds: resolved path -> [open fd, depth].
_held: dict[Path, list[int]] = {}


class OutputLocked(RuntimeError):
    """Another run holds the output folder."""


def _holder_record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
    }


def describe_holder(holder: dict[str, Any]) -> str:
    """`pid 123 on host, started 2026-..., command: ...`"""
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started_utc', '?')}"
    return text + (f" ({holder['command']})" if holder.get("command") else "")


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The lock file's record, or None while its creator has not written it yet."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 65536)
    try:
        holder = json.loads(data) if data.strip() else None
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) or holder is None else {}


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(_holder_record()) + "\n").encode("utf-8"))
    os.fsync(fd)


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _acquire(path: Path, step: str) -> int:
    """Open, lock and claim the lock file; raise OutputLocked when another run holds it."""
    for _ in range(50):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            fd = None
        if fd is not None:
            _flock(fd)  # a new file: nobody else can hold it yet
            _write_holder(fd)
            return fd
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # released meanwhile: try to create it again
            continue
        if not _flock(fd):
            holder = _read_holder(fd) or {}
            os.close(fd)
            raise OutputLocked(
                f"{path.parent}: another {step} run is writing here ({describe_holder(holder)}); "
                f"wait for it to finish or use another output folder"
            )
        # We hold the kernel lock: the file's creator is gone, unless it is between its
        # O_EXCL create and its flock, or released the file after we opened it.
        holder = _read_holder(fd)
        if holder is None or not _same_file(fd, path):
            os.close(fd)
            continue
        if holder.get("host") != socket.gethostname():
            os.close(fd)
            raise OutputLocked(
                f"{path.parent}: locked by a run on another host ({describe_holder(holder)}); "
                f"if that run is over, remove {path}"
            )
        state = "still running but not holding it" if _pid_alive(holder.get("pid")) else "no longer running"
        log.warning("%s: taking over the lock of an earlier run (%s; %s)", path, describe_holder(holder), state)
        _write_holder(fd)
        return fd
    raise OutputLocked(f"{path}: could not take the lock (it keeps changing hands)")


def _forget_in_child() -> None:
    # A forked worker shares the parent's lock; it closes its copies (which leaves the
    # parent's kernel lock in place) so that the lock ends with the parent.
    for fd, _depth in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


@contextlib.contextmanager
def output_lock(
    folder: str | os.PathLike[str], step: str = "serec", name: str = LOCK_NAME
) -> Iterator[Path]:
    """Hold FOLDER/.serec.lock (or FOLDER/NAME) for the duration; the folder is created if needed.

    Raises OutputLocked, naming the holder, when another run holds it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    key = path.resolve()
    if key in _held:
        _held[key][1] += 1
    else:
        _held[key] = [_acquire(path, step), 1]
    try:
        yield path
    finally:
        entry = _held[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            # Unlink while still holding the kernel lock, so that a run which opened the
            # old file sees it is no longer the file at this path.
            with contextlib.suppress(FileNotFoundError):
                if _same_file(entry[0], path):
                    path.unlink()
            os.close(entry[0])


__all__ = ["LOCK_NAME", "OutputLocked", "describe_holder", "output_lock"]
