"""The one per-file runner: chunks of files (work units) run by a backend, rows handed back.

Every step that fans per-file work out (mixing, enhancement, features, routing,
assessment, DNSMOS files) describes it as a `ChunkJob` (set up per process, process a
unit, describe a unit's failure) and calls `run_units`. A backend runs the units and
hands each unit's rows back to the calling process, which alone writes them; progress
bars advance as units finish. `LocalBackend` runs them here or in worker processes; a
cluster backend is one more `Backend` subclass.

Worker processes are disposable: a worker that crashes (a segfault in a native library,
`os._exit`) costs only the unit it was running, whose files are retried one by one in a
fresh worker so that only the file that crashes it is recorded as an error. Workers exit
when their parent dies (without moving a half-done output into place) and on Ctrl-C the
parent stops them at once, keeping every row that had already come back.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Generic, TypeVar

from threadpoolctl import threadpool_limits
from tqdm import tqdm

T = TypeVar("T")

# How long stopped workers get to remove their temp files before they are killed.
STOP_GRACE_S = 2.0
# How often a worker checks that its parent is alive, where the kernel cannot tell it.
PARENT_POLL_S = 0.5


def use_single_thread() -> None:
    """Limit this process to one compute thread (OpenMP, BLAS, and torch if it is loaded).

    N single-threaded workers then use N cores without oversubscription, which on a
    small machine makes the difference between scaling and slowing down.
    """
    os.environ["OMP_NUM_THREADS"] = "1"
    threadpool_limits(1)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


@dataclass(frozen=True)
class WorkUnit(Generic[T]):
    """A chunk of items (files) of one kind of work, e.g. the files one model enhances.

    `key` names what runs the items (a model, a system, a step's phase): progress bars
    and a backend's resources are per key.
    """

    key: str
    items: tuple[T, ...]


@dataclass(frozen=True)
class Resources:
    """What one unit of a key needs from a cluster backend (a local worker is one CPU)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


def chunk_units(key: str, items: Sequence[T], size: int) -> list[WorkUnit[T]]:
    """Consecutive chunks of at most `size` items, all under one key."""
    size = max(1, size)
    return [WorkUnit(key, tuple(items[i : i + size])) for i in range(0, len(items), size)]


class ChunkJob(ABC, Generic[T]):
    """A step's per-file work, as the runner sees it.

    `process` returns exactly one result (a row) per item, in item order; `failed`
    describes every item of a unit that could not be processed. State built by `setup`
    lives in attributes starting with `_`: it stays in its process and is never pickled,
    so a job is cheap to send to a worker.
    """

    # Exceptions that mean "these files failed", recorded by `failed`; anything else is
    # a bug and stops the run with its traceback.
    recoverable: tuple[type[BaseException], ...] = (Exception,)

    def setup(self, threads: int | None) -> None:  # noqa: B027 - most jobs need no state
        """Build per-process state (models, scorers) once in each process that runs units.

        `threads` is the compute threads this process may use: 1 in a worker beside
        others, None (the libraries' default) when it has the machine to itself.
        """

    @abstractmethod
    def process(self, unit: WorkUnit[T]) -> list[Any]:
        """One result per item of `unit`, in order."""

    @abstractmethod
    def failed(self, unit: WorkUnit[T], reason: str) -> list[Any]:
        """One result per item of `unit` recording that it failed for `reason`."""

    def in_main(self, unit: WorkUnit[T]) -> bool:
        """Whether a local backend must run the unit in the calling process (e.g. it starts
        its own subprocess); a cluster backend runs it as a task with `resources` instead."""
        return False

    def resources(self, key: str) -> Resources:
        """What a unit of `key` needs on a cluster (default: one CPU)."""
        return Resources()

    def writes_to(self) -> tuple[Path, ...]:
        """Folders the workers write into (a cluster backend checks every node can)."""
        return ()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class WorkerError(RuntimeError):
    """A bug in a worker (an unexpected exception or a worker unable to start): stops the run."""


def process_safely(job: ChunkJob[T], unit: WorkUnit[T]) -> list[Any]:
    """`job.process`, with a recoverable failure recorded on each of the unit's items."""
    try:
        rows = job.process(unit)
    except job.recoverable as exc:
        rows = job.failed(unit, f"{type(exc).__name__}: {exc}")
    if len(rows) != len(unit.items):
        raise WorkerError(f"{type(job).__name__} returned {len(rows)} rows for {len(unit.items)} items")
    return rows


def crash_reason(exitcode: int | None) -> str:
    """Why a worker disappeared, as a file's error reason."""
    if exitcode is not None and exitcode < 0:
        try:
            name = f", {signal.Signals(-exitcode).name}"
        except ValueError:
            name = ""
        return f"worker crashed (signal {-exitcode}{name}) while processing this file"
    return f"worker exited (status {exitcode}) while processing this file"


def after_crash(
    job: ChunkJob[T], unit: WorkUnit[T], reason: str
) -> tuple[list[WorkUnit[T]], list[Any]]:
    """A unit whose worker died: retry its items one by one, or record the one that crashed.

    Returns (units to run again, results to record now).
    """
    if len(unit.items) > 1:
        return [WorkUnit(unit.key, (item,)) for item in unit.items], []
    return [], job.failed(unit, reason)


class Backend(ABC):
    """Runs work units somewhere and yields (unit, results) as units finish."""

    def check(self, job: ChunkJob[Any], keys: Sequence[str]) -> None:  # noqa: B027 - local: nothing to check
        """Raise, before any work, if units of these keys cannot run here (e.g. no GPU)."""

    @abstractmethod
    def run(self, job: ChunkJob[T], units: Sequence[WorkUnit[T]]) -> Iterator[tuple[WorkUnit[T], list[Any]]]:
        """Every unit's results (a crashed unit's through `after_crash`), in completion order."""


class InProcessBackend(Backend):
    """Runs every unit in this process, in order: no isolation, no start-up cost."""

    def run(self, job: ChunkJob[T], units: Sequence[WorkUnit[T]]) -> Iterator[tuple[WorkUnit[T], list[Any]]]:
        if units:
            job.setup(None)
        for unit in units:
            yield unit, process_safely(job, unit)


class LocalBackend(Backend):
    """Worker processes on this machine (a fresh pool per run).

    With one worker and `isolate` False, units run in this process. `isolate` runs even a
    single worker in a child process, so that a native crash costs a file, not the run:
    steps that call native enhancers and metrics ask for it. Units for which
    `job.in_main` is true run in this process first.
    """

    def __init__(self, num_workers: int = 1, isolate: bool = False) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        self.num_workers = num_workers
        self.isolate = isolate

    def run(self, job: ChunkJob[T], units: Sequence[WorkUnit[T]]) -> Iterator[tuple[WorkUnit[T], list[Any]]]:
        if self.num_workers == 1 and not self.isolate:
            yield from InProcessBackend().run(job, units)
            return
        main = [u for u in units if job.in_main(u)]
        rest = [u for u in units if not job.in_main(u)]
        # A copy is set up here, so the workers forked next do not inherit (and then drop)
        # this process's native state, such as onnxruntime sessions and their threads.
        yield from InProcessBackend().run(copy.copy(job), main)
        if rest:
            yield from _WorkerPool(job, min(self.num_workers, len(rest))).run(rest)


def run_units(
    job: ChunkJob[T],
    units: Sequence[WorkUnit[T]],
    backend: Backend,
    record: Callable[[WorkUnit[T], list[Any]], None],
    *,
    desc: str,
    per_key: bool = False,
    show: bool = True,
    leave: bool = True,
) -> None:
    """Run every unit on `backend`; call `record(unit, results)` here as each one finishes.

    Progress: one bar (`desc`), or one per key. On Ctrl-C or an error the backend's
    workers are stopped before this returns; results already recorded stay recorded.
    """
    backend.check(job, sorted({unit.key for unit in units}))
    totals: dict[str, int] = {}
    for unit in units:
        bar_key = unit.key if per_key else desc
        totals[bar_key] = totals.get(bar_key, 0) + len(unit.items)
    bars = {
        key: tqdm(total=total, desc=f"{key:>16}" if per_key else desc, unit="file",
                  position=i if per_key else None, leave=leave, disable=not show)
        for i, (key, total) in enumerate(totals.items())
    }
    try:
        with contextlib.closing(backend.run(job, units)) as results:
            for unit, rows in results:
                record(unit, rows)
                bars[unit.key if per_key else desc].update(len(unit.items))
    finally:
        for bar in bars.values():
            bar.close()


# ---------------------------------------------------------------------------------------
# Worker processes


def _mp_context() -> multiprocessing.context.BaseContext:
    # fork: workers start in milliseconds and inherit everything the parent registered
    # (enhancers added at run time, e.g. by tests). macOS forks unsafely: its default.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _exit_with_parent(parent_pid: int) -> None:
    """Make this worker stop when its parent dies, however the parent dies (kill -9 too)."""
    if sys.platform.startswith("linux"):
        # The kernel sends SIGTERM when the parent exits (PR_SET_PDEATHSIG = 1).
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the line above took effect
        os._exit(1)
    # Elsewhere (and as a backstop): a thread that notices being re-parented.
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    # SIGTERM becomes SystemExit in the main thread, which removes temp files on its way
    # out; a main thread stuck in native code is cut short after a grace period.
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_S)
    os._exit(1)


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _worker_main(job: ChunkJob[Any], conn: Connection, parent_pid: int, threads: int | None,
                 inherited: Sequence[Connection]) -> None:
    # Ctrl-C is the parent's to handle; SIGTERM (the parent stopping us, or its death)
    # unwinds through `atomic_path`, so no temp file is moved into place or left behind.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_system_exit)
    _exit_with_parent(parent_pid)
    for other in inherited:  # other workers' pipes, copied by fork: theirs to close
        other.close()
    try:
        if threads == 1:
            use_single_thread()
        job.setup(threads)
    except Exception:
        conn.send(("setup_failed", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            unit = conn.recv()
        except EOFError:  # the parent is gone
            return
        if unit is None:
            return
        try:
            conn.send(("done", process_safely(job, unit)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    ready: bool = False
    unit: WorkUnit[Any] | None = None


class _WorkerPool:
    """Worker processes, each running one unit at a time, replaced when one dies."""

    def __init__(self, job: ChunkJob[Any], num_workers: int) -> None:
        self.job = job
        self.num_workers = num_workers
        self.threads = 1 if num_workers > 1 else None
        self.workers: list[_Worker] = []
        self.context = _mp_context()

    def _start(self) -> None:
        parent_conn, child_conn = self.context.Pipe()
        process = self.context.Process(
            target=_worker_main,
            args=(self.job, child_conn, os.getpid(), self.threads, [w.conn for w in self.workers]),
            name=f"serec-{type(self.job).__name__}",
        )
        process.start()
        child_conn.close()
        self.workers.append(_Worker(process, parent_conn))

    def run(self, units: Iterable[WorkUnit[Any]]) -> Iterator[tuple[WorkUnit[Any], list[Any]]]:
        queue: deque[WorkUnit[Any]] = deque(units)
        try:
            while queue or any(w.unit is not None for w in self.workers):
                busy = sum(w.unit is not None for w in self.workers)
                while len(self.workers) < min(self.num_workers, busy + len(queue)):
                    self._start()
                for worker in self.workers:
                    if worker.ready and worker.unit is None and queue:
                        worker.unit = queue.popleft()
                        worker.conn.send(worker.unit)
                waitables = [w.conn for w in self.workers] + [w.process.sentinel for w in self.workers]
                wait(waitables)
                for worker in list(self.workers):
                    yield from self._service(worker, queue)
        finally:
            self._stop()

    def _service(self, worker: _Worker, queue: deque[WorkUnit[Any]]) -> Iterator[tuple[WorkUnit[Any], list[Any]]]:
        """Take a worker's messages; replace it if it died, blaming the unit it was running."""
        while worker.conn.poll():
            try:
                kind, payload = worker.conn.recv()
            except (EOFError, OSError):
                break
            if kind == "ready":
                worker.ready = True
            elif kind == "done":
                unit, worker.unit = worker.unit, None
                assert unit is not None
                yield unit, payload
            elif kind == "setup_failed":
                raise WorkerError(f"a worker could not start:\n{payload}")
            else:
                raise WorkerError(f"a worker failed on {worker.unit}:\n{payload}")
        if worker.process.is_alive():
            return
        worker.process.join()
        worker.conn.close()
        self.workers.remove(worker)
        if not worker.ready:
            raise WorkerError(f"a worker died while starting ({crash_reason(worker.process.exitcode)})")
        if worker.unit is not None:
            again, rows = after_crash(self.job, worker.unit, crash_reason(worker.process.exitcode))
            queue.extendleft(reversed(again))
            if rows:
                yield worker.unit, rows

    def _stop(self) -> None:
        """Stop every worker now: idle ones are told to leave, busy ones get SIGTERM, then SIGKILL."""
        for worker in self.workers:
            if worker.unit is None and worker.ready:
                with contextlib.suppress(OSError):
                    worker.conn.send(None)
            else:
                worker.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self.workers.clear()


__all__ = [
    "Backend",
    "ChunkJob",
    "InProcessBackend",
    "LocalBackend",
    "Resources",
    "WorkUnit",
    "WorkerError",
    "after_crash",
    "chunk_units",
    "crash_reason",
    "process_safely",
    "run_units",
    "use_single_thread",
]
