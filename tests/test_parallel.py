"""The per-file runner: results per item, crash isolation, Ctrl-C, parent death (kill -9)."""

from __future__ import annotations

import csv
import faulthandler
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serec.audio import write_wav
from serec.enhancement import EnhancementConfig, run_enhancement
from serec.enhancers import BuiltinEnhancer, register_enhancer
from serec.parallel import (
    ChunkJob,
    InProcessBackend,
    LocalBackend,
    WorkerError,
    WorkUnit,
    chunk_units,
    run_units,
)
from serec.synth import speech_like

ROOT = Path(__file__).resolve().parents[1]


def crash_on_purpose() -> None:
    """Kill this process with SIGSEGV, as a crashing native library would; without the
    traceback dump of pytest's faulthandler, which is noise for a crash a test causes."""
    faulthandler.disable()
    os.kill(os.getpid(), signal.SIGSEGV)


class ToyJob(ChunkJob[int]):
    """Squares items; crashes its worker, exits it, or raises on chosen items."""

    def __init__(self, crash_on: tuple[int, ...] = (), exit_on: tuple[int, ...] = (),
                 raise_on: tuple[int, ...] = (), bug_on: tuple[int, ...] = ()) -> None:
        self.crash_on, self.exit_on, self.raise_on, self.bug_on = crash_on, exit_on, raise_on, bug_on

    recoverable = (ValueError,)

    def setup(self, threads: int | None) -> None:
        self._threads = threads

    def process(self, unit: WorkUnit[int]) -> list[Any]:
        for item in unit.items:
            if item in self.crash_on:
                crash_on_purpose()
            if item in self.exit_on:
                os._exit(3)
            if item in self.raise_on:
                raise ValueError(f"bad item {item}")
            if item in self.bug_on:
                raise KeyError(item)
        return [("ok", item, item * item) for item in unit.items]

    def failed(self, unit: WorkUnit[int], reason: str) -> list[Any]:
        return [("error", item, reason) for item in unit.items]


def collect(job: ChunkJob[int], units: list[WorkUnit[int]], backend: Any) -> dict[int, tuple]:
    results: dict[int, tuple] = {}

    def record(unit: WorkUnit[int], rows: list[Any]) -> None:
        for item, row in zip(unit.items, rows, strict=True):
            assert item not in results, f"item {item} recorded twice"
            results[item] = row

    run_units(job, units, backend, record, desc="toy", show=False)
    return results


@pytest.mark.parametrize("num_workers", [1, 2])
def test_a_crashing_worker_costs_only_the_file_that_crashed_it(num_workers: int) -> None:
    job = ToyJob(crash_on=(6,), exit_on=(13,), raise_on=(17,))
    results = collect(job, chunk_units("toy", list(range(20)), 4), LocalBackend(num_workers, isolate=True))
    assert sorted(results) == list(range(20))
    assert results[6] == ("error", 6, "worker crashed (signal 11, SIGSEGV) while processing this file")
    assert results[13] == ("error", 13, "worker exited (status 3) while processing this file")
    # A recoverable exception is the unit's failure, recorded on each of its files.
    assert [results[i] for i in (16, 17, 18, 19)] == [("error", i, "ValueError: bad item 17") for i in (16, 17, 18, 19)]
    assert all(results[i] == ("ok", i, i * i) for i in set(range(16)) - {6, 13})
    assert not multiprocessing.active_children()


def test_in_process_and_worker_results_are_the_same() -> None:
    units = chunk_units("toy", list(range(10)), 3)
    here = collect(ToyJob(raise_on=(4,)), units, InProcessBackend())
    workers = collect(ToyJob(raise_on=(4,)), units, LocalBackend(2))
    assert here == workers


def test_a_bug_in_a_worker_stops_the_run_with_its_traceback() -> None:
    with pytest.raises(WorkerError, match="KeyError: 5"):
        collect(ToyJob(bug_on=(5,)), chunk_units("toy", list(range(12)), 2), LocalBackend(2))
    assert not multiprocessing.active_children()


class FailingSetup(ToyJob):
    def setup(self, threads: int | None) -> None:
        raise OSError("no model here")


def test_a_worker_that_cannot_start_stops_the_run() -> None:
    with pytest.raises(WorkerError, match="no model here"):
        collect(FailingSetup(), chunk_units("toy", [1, 2, 3], 1), LocalBackend(2))


def test_interrupt_keeps_recorded_results_and_stops_workers_at_once() -> None:
    class Slow(ToyJob):
        def process(self, unit: WorkUnit[int]) -> list[Any]:
            time.sleep(0.2 if unit.items[0] == 0 else 30)
            return super().process(unit)

    recorded: list[int] = []

    def record(unit: WorkUnit[int], rows: list[Any]) -> None:
        recorded.extend(unit.items)
        raise KeyboardInterrupt  # as if Ctrl-C arrived right after the first unit

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_units(Slow(), chunk_units("toy", list(range(6)), 1), LocalBackend(2), record,
                  desc="toy", show=False)
    assert recorded == [0]
    assert time.monotonic() - started < 10
    assert not multiprocessing.active_children()


# ---------------------------------------------------------------------------------------
# Through the enhancement step: a toy enhancer that crashes the process on one file


@register_enhancer("test_segfault_on_marked")
class SegfaultOnMarked(BuiltinEnhancer):
    """Passthrough, except a file whose id contains 'crash' kills its process with SIGSEGV."""

    def enhance_batch(self, audios, sr=16_000, file_ids=None):  # type: ignore[no-untyped-def]
        if any("crash" in fid for fid in file_ids or ()):
            crash_on_purpose()
        return super().enhance_batch(audios, sr, file_ids)

    def process(self, audio: np.ndarray) -> np.ndarray:
        return audio * 0.5


def _noisy_folder(root: Path, names: list[str]) -> Path:
    rng = np.random.default_rng(5)
    for name in names:
        write_wav(root / name, speech_like(rng, 1.0) + 0.05 * rng.standard_normal(16_000))
    return root


def _rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as fh:
        return {(r["file"], r["system"]): r for r in csv.DictReader(fh)}


def test_enhancer_segfault_costs_one_file_and_a_rerun_does_not_crash_again(tmp_path: Path) -> None:
    noisy = _noisy_folder(tmp_path / "noisy", ["a.wav", "b_crash.wav"])
    config = EnhancementConfig(noisy_dir=noisy, output_dir=tmp_path / "out",
                               models=["test_segfault_on_marked"], chunk_size=8)
    summary = run_enhancement(config)
    rows = _rows(summary.scores_csv)
    crashed = rows[("b_crash.wav", "test_segfault_on_marked")]
    assert crashed["status"] == "error"
    assert crashed["error"] == "worker crashed (signal 11, SIGSEGV) while processing this file"
    # It shared a chunk with the crash: retried alone, it is done.
    assert rows[("a.wav", "test_segfault_on_marked")]["status"] == "ok"
    assert (tmp_path / "out" / "enhanced" / "test_segfault_on_marked" / "a.wav").is_file()
    assert summary.errors == 1

    again = run_enhancement(config)
    assert again.pairs_done_now == 0 and again.errors == 1
    retried = run_enhancement(EnhancementConfig(**{**vars(config), "retry_errors": True}))
    assert retried.pairs_done_now == 1 and retried.errors == 1


# ---------------------------------------------------------------------------------------
# kill -9 and Ctrl-C of a driver running two workers

SLOW_DRIVER = """
import sys, time
sys.path.insert(0, {root!r})
import enhancement_driver
from serec.enhancers import BuiltinEnhancer, register_enhancer

@register_enhancer("test_slow")
class Slow(BuiltinEnhancer):
    def process(self, audio):
        time.sleep(0.4)
        return audio * 0.5

sys.exit(enhancement_driver.main(sys.argv[1:]))
"""


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _start_slow_driver(tmp_path: Path, n_files: int) -> tuple[subprocess.Popen, Path, list[int]]:
    noisy = _noisy_folder(tmp_path / "noisy", [f"f{i:02d}.wav" for i in range(n_files)])
    script = tmp_path / "slow_driver.py"
    script.write_text(SLOW_DRIVER.format(root=str(ROOT)))
    out = tmp_path / "out"
    # Output to files: a full pipe would stall the driver's progress bars.
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(script), "--noisy_dir", str(noisy), "--output_dir", str(out),
             "--models", "test_slow", "--num_workers", "2", "--chunk_size", "1"],
            stdout=stdout, stderr=stderr, text=True, start_new_session=True,
            # A shell starts background jobs (CI, `make test &`) with SIGINT ignored; Python
            # then never raises KeyboardInterrupt, so the Ctrl-C test restores the default.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        workers = _children(proc.pid)
        scores = out / "scores.csv"
        if len(workers) >= 2 and scores.exists() and scores.read_text().count("\n") >= 3:
            return proc, out, workers
        if proc.poll() is not None:
            raise AssertionError(f"driver ended early ({proc.returncode}): "
                                 f"{(tmp_path / 'stderr.txt').read_text()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the driver never had two workers busy")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_driver_leaves_no_worker_behind(tmp_path: Path) -> None:
    proc, out, workers = _start_slow_driver(tmp_path, 24)
    os.kill(proc.pid, signal.SIGKILL)
    killed_at = time.time()
    proc.wait()
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if _alive(pid)], "workers outlived their parent by 15 s"
    # Nothing was moved into place after the parent died (the test's 0.5 s covers a write
    # the kill landed in the middle of).
    late = [p for p in (out / "enhanced").rglob("*.wav") if p.stat().st_mtime > killed_at + 0.5]
    assert not late


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_keeps_finished_rows_and_exits_130_at_once(tmp_path: Path) -> None:
    proc, out, workers = _start_slow_driver(tmp_path, 24)
    done_before = len(_rows(out / "scores.csv"))
    os.killpg(proc.pid, signal.SIGINT)  # the terminal sends it to the whole process group
    started = time.monotonic()
    proc.wait(timeout=60)
    # At once: without the handling it waits for the chunks in flight (minutes); 20 s leaves
    # room for a loaded 2-core CI machine.
    assert time.monotonic() - started < 20
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130
    assert "Traceback" not in stderr and "interrupted" in stderr.splitlines()[-1]
    assert not [pid for pid in workers if _alive(pid)]
    rows = _rows(out / "scores.csv").values()
    assert len(rows) >= done_before and all(r["status"] == "ok" for r in rows)
