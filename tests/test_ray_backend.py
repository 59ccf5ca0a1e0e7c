"""The Ray backend: same files as the local backend, a killed Ray worker loses nothing, bad setups fail early."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serec.audio import write_wav
from serec.enhancement import EnhancementConfig, run_enhancement
from serec.enhancer_jobs import EnhancerJob
from serec.enhancers import create_enhancer
from serec.feature_files import run_feature_extraction
from serec.parallel import LocalBackend, Resources, WorkUnit
from serec.synth import NOISE_KINDS, speech_like

ray = pytest.importorskip("ray")

from serec.ray_backend import RayBackend, RayUnavailable, check_reachable, task_options  # noqa: E402

MODELS = ["webrtc", "speex"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_instance() -> None:
    """One local Ray instance with 2 CPUs for the module (starting one takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def make_pairs(root: Path, n: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(21)
    for i in range(n):
        speech = speech_like(rng, 1.0)
        write_wav(root / "clean" / f"f{i:02d}.wav", speech)
        write_wav(root / "noisy" / f"f{i:02d}.wav", speech + 0.3 * NOISE_KINDS["pink"](rng, 1.0))
    return root / "noisy", root / "clean"


def read_rows(path: Path, drop: str = "seconds") -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k != drop} for row in csv.DictReader(fh)]


def test_ray_gives_the_same_files_as_local(tmp_path: Path, ray_instance: None) -> None:
    noisy, clean = make_pairs(tmp_path, 3)
    outs = {}
    for name, backend in (("local", LocalBackend(2, isolate=True)), ("ray", RayBackend())):
        config = EnhancementConfig(noisy_dir=noisy, clean_dir=clean, output_dir=tmp_path / name,
                                   models=MODELS, chunk_size=2)
        outs[name] = run_enhancement(config, backend=backend)
    local, remote = outs["local"], outs["ray"]
    assert remote.errors == 0 and remote.pairs_done_now == local.pairs_done_now == 9
    assert read_rows(remote.scores_csv) == read_rows(local.scores_csv)
    assert remote.labels_csv.read_bytes() == local.labels_csv.read_bytes()
    for model in MODELS:
        for wav in (tmp_path / "local" / "enhanced" / model).glob("*.wav"):
            assert (tmp_path / "ray" / "enhanced" / model / wav.name).read_bytes() == wav.read_bytes()


def _actor_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"_UnitRunner" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds Ray's worker processes in /proc")
def test_killing_a_ray_worker_mid_run_loses_nothing(tmp_path: Path, ray_instance: None) -> None:
    noisy, _ = make_pairs(tmp_path, 8)
    config = EnhancementConfig(noisy_dir=noisy, output_dir=tmp_path / "out", models=["spectral_gating"],
                               chunk_size=2)
    killed: list[int] = []

    def kill_one_worker_once_rows_arrive() -> None:
        scores = config.output_dir / "scores.csv"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pids = _actor_pids()
            if pids and scores.exists() and scores.read_text().count("\n") >= 3:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker_once_rows_arrive)
    killer.start()
    summary = run_enhancement(config, backend=RayBackend())
    killer.join()
    assert killed, "no Ray worker was killed (the run ended first?)"
    rows = read_rows(summary.scores_csv)
    pairs = [(r["file"], r["system"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == 16, "every pair once"
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    assert run_enhancement(config, backend=RayBackend()).pairs_done_now == 0


class NamesJob(EnhancerJob[str]):
    """An enhancer job that only echoes its files (the resource rules are EnhancerJob's)."""

    def process(self, unit: WorkUnit[str]) -> list[str]:
        return list(unit.items)

    def failed(self, unit: WorkUnit[str], reason: str) -> list[str]:
        return [reason for _ in unit.items]


def test_a_gpu_declaration_reaches_the_task_options_and_is_checked(tmp_path: Path, ray_instance: None) -> None:
    table = {"type": "SGMSE", "repo": str(tmp_path), "ckpt": str(tmp_path / "x.ckpt"),
             "num_gpus": 1, "num_cpus": 2}
    enhancers = {"SGMSE_gpu": create_enhancer("SGMSE_gpu", table), "speex": create_enhancer("speex")}
    job = NamesJob(enhancers, {"SGMSE_gpu": table}, device="cuda", seed=0)
    assert job.resources("speex") == Resources()
    assert task_options(job.resources("SGMSE_gpu")) == {"num_cpus": 2.0, "num_gpus": 1.0, "max_retries": 1}
    with pytest.raises(RayUnavailable, match=r"SGMSE_gpu asks for 1 GPU\(s\) .* the Ray cluster has 0"):
        RayBackend().check(job, ["speex", "SGMSE_gpu"])


def test_an_output_folder_a_worker_cannot_write_fails_before_any_work(tmp_path: Path, ray_instance: None) -> None:
    noisy, _ = make_pairs(tmp_path, 1)
    (tmp_path / "file").write_text("not a folder")
    config = EnhancementConfig(noisy_dir=noisy, output_dir=tmp_path / "file" / "out", models=["speex"])
    job = NamesJob({"speex": create_enhancer("speex")}, {}, "cpu", 0)
    job.writes_to = lambda: (config.output_dir,)  # type: ignore[method-assign]
    with pytest.raises(RayUnavailable, match=r"every Ray node can write; cannot write node .*file/out"):
        RayBackend().check(job, ["speex"])


def test_an_unreachable_address_fails_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(RayUnavailable, match="no Ray head answers there"):
        check_reachable("127.0.0.1:9")
    with pytest.raises(RayUnavailable, match="expected HOST:PORT"):
        check_reachable("nowhere")
    assert time.monotonic() - started < 10


def test_the_driver_refuses_an_unreachable_cluster_before_any_work(tmp_path: Path) -> None:
    noisy, _ = make_pairs(tmp_path, 1)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "enhancement_driver.py"), "--noisy_dir", str(noisy),
         "--output_dir", str(tmp_path / "out"), "--models", "speex", "--backend", "ray",
         "--ray_address", "127.0.0.1:9"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "no Ray head answers there" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_ray_features_are_the_local_ones(tmp_path: Path, ray_instance: None) -> None:
    noisy, _ = make_pairs(tmp_path, 3)
    for name, backend in (("local", LocalBackend(2)), ("ray", RayBackend())):
        summary = run_feature_extraction(noisy, tmp_path / name, progress=False, backend=backend)
        assert summary.done == 3 and summary.errors == 0
    for vector in (tmp_path / "local").glob("*.npy"):
        assert (tmp_path / "ray" / vector.name).read_bytes() == vector.read_bytes()
