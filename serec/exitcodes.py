"""The exit statuses every serec command returns: one table for all steps (README: Exit statuses)."""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """What a command's exit status means; the same number means the same thing for every step."""

    OK = 0
    # 1 is left to Python itself: an uncaught exception (a bug) exits 1 with a traceback.
    USAGE = 2
    """Bad flags, configuration or data: nothing (more) was run; one line says why."""
    PARTIAL = 3
    """Finished, but some files failed or were left out; the step's CSV lists them with reasons."""
    INTERRUPTED = 130
    """Ctrl-C (128 + SIGINT): finished work is kept, the same command resumes."""


def partial_or_ok(failures: int) -> ExitStatus:
    """PARTIAL when any file failed or was left out, else OK."""
    return ExitStatus.PARTIAL if failures else ExitStatus.OK
