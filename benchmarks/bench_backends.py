"""The local backend against Ray on real mixtures: wall time, overhead per file, identical results.

Runs enhancement_driver.py on the same noisy (and clean) files three ways, each into a
fresh folder under --work_dir: the local backend with --num_workers workers; Ray on a
local instance the driver starts (every CPU of this machine); and, with --two_nodes, a
two-node Ray cluster on this machine (`ray start --head` and `ray start --address`, each
with one CPU, on loopback, token authentication on). Give the local backend as many
workers as the machine has CPUs, so every run has the same CPUs. Each run is timed from
outside (process start to exit, so Ray's start-up, connection and shut-down count), and
Ray's overhead per file = (its wall time - the local wall time) / files. Then scores.csv
(apart from `seconds`) and labels.csv of every run are compared with the local run's. For
the two-node run the script samples every raylet's process tree every 2 s: a raylet with
a busy Ray worker under it is a node that worked.

    python benchmarks/bench_backends.py --noisy_dir runs/zoo/mix100/noisy --clean_dir runs/zoo/mix100/clean \\
        --models deepfilternet3 webrtc --work_dir runs/backends --two_nodes
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from serec.experiment import markdown_table
from serec.schema import LABELS_CSV, SCORES_CSV

ROOT = Path(__file__).resolve().parents[1]
RAY_PORT = 26391


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noisy_dir", type=Path, required=True)
    parser.add_argument("--clean_dir", type=Path, help="clean references (PESQ/STOI/SI-SDR are scored too)")
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--work_dir", type=Path, required=True, help="one fresh output folder per run goes here")
    parser.add_argument("--num_workers", type=int, default=2, help="local backend workers")
    parser.add_argument("--limit", type=int, help="only the first N files")
    parser.add_argument("--two_nodes", action="store_true", help="also run on a two-node cluster on loopback")
    return parser.parse_args()


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def child_pids(pid: int) -> set[int]:
    """Every descendant of `pid`, from /proc (no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def raylet_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "raylet":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return sorted(pids)


def has_busy_worker(pid: int) -> bool:
    """Whether a raylet has a serec worker (an actor or task process) under it."""
    for child in child_pids(pid):
        try:
            cmd = (Path("/proc") / str(child) / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "ray::" in cmd and "IDLE" not in cmd:
            return True
    return False


def run_driver(args: argparse.Namespace, out: Path, extra: list[str], env: dict[str, str],
               watch_raylets: bool = False) -> tuple[float, int]:
    """Wall seconds of one enhancement_driver.py run, and how many raylets had busy workers."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "enhancement_driver.py"), "--noisy_dir", str(args.noisy_dir),
           "--output_dir", str(out), "--models", *args.models, *extra]
    if args.clean_dir:
        cmd += ["--clean_dir", str(args.clean_dir)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    busy: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(2.0):
            busy.update(pid for pid in raylet_pids() if has_busy_worker(pid))

    watcher = threading.Thread(target=watch, daemon=True)
    if watch_raylets:
        watcher.start()
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    stop.set()
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return wall, len(busy)


def main() -> None:
    args = parse_args()
    env = dict(os.environ, RAY_AUTH_MODE="token")
    cpus = os.cpu_count() or 1
    runs = [("local", ["--backend", "local", "--num_workers", str(args.num_workers)], args.num_workers),
            ("ray (local instance)", ["--backend", "ray"], cpus)]
    results = []
    for name, extra, workers in runs:
        out = args.work_dir / name.split()[0]
        wall, _ = run_driver(args, out, extra, env)
        results.append((name, out, wall, workers, 0))
        print(f"{name}: {wall:.1f} s", flush=True)
    if args.two_nodes:
        ray = [str(Path(sys.executable).with_name("ray"))]
        address = f"127.0.0.1:{RAY_PORT}"
        subprocess.run(ray + ["start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(RAY_PORT),
                              "--num-cpus", "1", "--include-dashboard", "false"], env=env, check=True,
                       capture_output=True)
        try:
            subprocess.run(ray + ["start", "--address", address, "--node-ip-address", "127.0.0.1",
                                  "--num-cpus", "1"], env=env, check=True, capture_output=True)
            out = args.work_dir / "two_nodes"
            wall, nodes = run_driver(args, out, ["--backend", "ray", "--ray_address", address], env,
                                     watch_raylets=True)
            results.append(("ray (two nodes, 1 CPU each)", out, wall, 2, nodes))
            print(f"two nodes: {wall:.1f} s, {nodes} nodes worked", flush=True)
        finally:
            subprocess.run(ray + ["stop", "--force"], env=env, capture_output=True)

    local_scores, local_labels = read_rows(results[0][1] / SCORES_CSV), (results[0][1] / LABELS_CSV).read_bytes()
    files, local_wall = len({row["file"] for row in local_scores}), results[0][2]
    rows = []
    for name, out, wall, workers, nodes in results:
        same = read_rows(out / SCORES_CSV) == local_scores and (out / LABELS_CSV).read_bytes() == local_labels
        rows.append([name, workers, files, len(local_scores), f"{wall:.1f}", f"{wall / files:.2f}",
                     f"{(wall - local_wall) / files:+.2f}", str(nodes) if nodes else "",
                     "yes" if same else "NO"])
    print()
    print(markdown_table(["backend", "CPUs", "files", "(file, system) rows", "wall s", "wall s / file",
                          "overhead s / file vs local", "nodes that worked", "same scores.csv and labels.csv"],
                         rows))

if __name__ == "__main__":
    main()
