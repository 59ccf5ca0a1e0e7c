"""One run per output folder: the lock names its holder, dies with it, and steps refuse a held folder."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from serec.audio import write_wav
from serec.lock import LOCK_NAME, OutputLocked, output_lock
from serec.synth import speech_like

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from serec.lock import output_lock
with output_lock(sys.argv[1], "holder"):
    print("locked", flush=True)
    time.sleep(600)
"""


def hold_in_subprocess(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder = hold_in_subprocess(tmp_path)
    try:
        with pytest.raises(OutputLocked, match=rf"another enhancement run .*pid {holder.pid} on {socket.gethostname()}"):
            with output_lock(tmp_path, "enhancement"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without removing its file: the kernel freed its lock, we take it over.
    assert (tmp_path / LOCK_NAME).exists()
    with caplog.at_level(logging.WARNING, logger="serec.lock"):
        with output_lock(tmp_path, "enhancement") as path:
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_reentrant_in_one_process_and_removed_at_the_end(tmp_path: Path) -> None:
    with output_lock(tmp_path / "out", "mixing") as path:
        with output_lock(tmp_path / "out", "mixing"):
            assert path.exists()
        assert path.exists()
    assert not path.exists()


def test_a_lock_from_another_host_is_refused_with_the_file_to_remove(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started_utc": "x"}))
    with pytest.raises(OutputLocked, match=rf"another host .*elsewhere.*remove {tmp_path / LOCK_NAME}"):
        with output_lock(tmp_path):
            pass


def test_the_lock_ends_with_a_killed_holder_even_when_its_workers_linger(tmp_path: Path) -> None:
    # A forked child closes its copy of the lock: only its parent holds it.
    with output_lock(tmp_path) as path:
        pid = os.fork()
        if pid == 0:  # the child: try to take the lock as a second run would
            try:
                with output_lock(tmp_path):
                    os._exit(0)
            except OutputLocked:
                os._exit(7)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 7
        assert path.exists()


def _noisy(folder: Path) -> Path:
    rng = np.random.default_rng(3)
    for i in range(2):
        write_wav(folder / f"f{i}.wav", speech_like(rng, 1.0) + 0.05 * rng.standard_normal(16_000))
    return folder


@pytest.mark.parametrize(
    "script, args",
    [
        ("enhancement_driver.py", ["--noisy_dir", "{noisy}", "--output_dir", "{out}", "--models", "speex"]),
        ("preprocess_features.py", ["--base_data_dir", "{noisy}", "--output_base_dir", "{out}"]),
    ],
)
def test_a_step_on_a_locked_folder_exits_2_naming_the_holder(tmp_path: Path, script: str, args: list[str]) -> None:
    noisy, out = _noisy(tmp_path / "noisy"), tmp_path / "out"
    with output_lock(out, "test"):
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(ROOT / script), *(a.format(noisy=noisy, out=out) for a in args)],
            capture_output=True, text=True, timeout=300,
        )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"pid {os.getpid()} on {socket.gethostname()}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(out.glob("*.csv")), "nothing was written into the locked folder"
    assert time.monotonic() - started < 120
