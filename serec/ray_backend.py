"""The Ray backend of the per-file runner: work units on a Ray instance, one machine or a cluster.

Units whose key needs only a CPU (built-in enhancers, scoring, features) run in a pool of
actors, one CPU each, that set the job up once and keep it (their enhancers and
onnxruntime sessions) for every unit. Units whose key asks for more (an external model's
`num_gpus`, `num_cpus`) run as Ray tasks with those resources. Workers write outputs
atomically straight into the output folder, which every node must see; rows come back to
the driver, which alone appends them. A worker that dies costs only its unit, which is
retried file by file like on the local backend, so no row is lost or written twice.

`--backend local|ray` and `--ray_address` of the scripts come from `add_backend_arguments`
and `backend_from_args`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from serec.parallel import (
    Backend,
    ChunkJob,
    LocalBackend,
    Resources,
    WorkerError,
    WorkUnit,
    after_crash,
    process_safely,
    use_single_thread,
)

BACKENDS = ("local", "ray")
# Seconds to connect to --ray_address before saying it is unreachable.
CONNECT_TIMEOUT_S = 5.0


class RayUnavailable(RuntimeError):
    """Ray cannot run this work as asked: not installed, unreachable, or missing a resource."""


def _import_ray() -> ModuleType:
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable(
            "--backend ray needs the ray package: .venv/bin/python -m pip install 'ray==2.60.0'"
        ) from exc
    return ray


def check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT nobody listens on (Ray itself waits about a minute)."""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"--ray_address {address!r}: expected HOST:PORT (the head's GCS port) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RayUnavailable(
            f"--ray_address {address}: no Ray head answers there ({exc}); start one with "
            f"`ray start --head --port {port}` or check the address"
        ) from exc


def _probe_writable(folders: list[str]) -> list[str]:
    """On a node: the folders a worker cannot create a file in, with the reason."""
    failures = []
    for folder in folders:
        probe = Path(folder) / f".serec-write-probe-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            failures.append(f"{folder} ({exc.strerror or exc})")
    return failures


def task_options(wanted: Resources) -> dict[str, Any]:
    """Ray options of a task for a unit with its own resources (e.g. a GPU model's batch).

    Ray retries it once if its worker dies (a lost node); after that its files are retried
    one by one and the one that keeps killing its worker is recorded as an error.
    """
    return {"num_cpus": wanted.num_cpus, "num_gpus": wanted.num_gpus, "max_retries": 1}


class _UnitRunner:
    """A Ray actor: one CPU, the job set up once, then unit after unit."""

    def __init__(self, job: ChunkJob[Any]) -> None:
        use_single_thread()
        job.setup(1)
        self.job = job

    def run(self, unit: WorkUnit[Any]) -> list[Any]:
        return process_safely(self.job, unit)


def _run_task(job: ChunkJob[Any], unit: WorkUnit[Any], threads: int) -> list[Any]:
    """A Ray task for a unit with its own resources: the job is set up for this unit."""
    if threads == 1:
        use_single_thread()
    job.setup(threads)
    return process_safely(job, unit)


class RayBackend(Backend):
    """Runs units on Ray: a local instance (`address` None, `num_cpus` of this machine by
    default) or the cluster at `address` (HOST:PORT, or `auto` for the one this machine
    runs). Connects on first use; every failure to do so is a RayUnavailable."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self._ray: ModuleType | None = None
        self._checked: set[str] = set()

    def connect(self) -> ModuleType:
        if self._ray is not None:
            return self._ray
        ray = _import_ray()
        if not ray.is_initialized():
            if self.address is not None:
                check_reachable(self.address)
            try:
                ray.init(address=self.address, num_cpus=self.num_cpus if self.address is None else None,
                         include_dashboard=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                hint = ("; a cluster with token authentication (Ray's default) also needs "
                        "RAY_AUTH_MODE=token here, the token in ~/.ray/auth_token"
                        if self.address and not os.environ.get("RAY_AUTH_MODE") else "")
                raise RayUnavailable(
                    f"cannot start or join Ray at {self.address or 'a new local instance'}: {exc}{hint}"
                ) from exc
        self._ray = ray
        return ray

    def check(self, job: ChunkJob[Any], keys: Sequence[str]) -> None:
        ray = self.connect()
        total = ray.cluster_resources()
        for key in keys:
            wanted = job.resources(key)
            if wanted.num_gpus > total.get("GPU", 0.0):
                raise RayUnavailable(
                    f"{key} asks for {wanted.num_gpus:g} GPU(s) per batch (num_gpus in its "
                    f"--models_config table) but the Ray cluster has {total.get('GPU', 0.0):g}"
                )
            if wanted.num_cpus > total.get("CPU", 0.0):
                raise RayUnavailable(
                    f"{key} asks for {wanted.num_cpus:g} CPUs per batch but the Ray cluster has "
                    f"{total.get('CPU', 0.0):g}"
                )
        folders = [str(Path(f).resolve()) for f in job.writes_to() if str(Path(f).resolve()) not in self._checked]
        if folders:
            self._check_writable(ray, folders)
            self._checked.update(folders)

    def _check_writable(self, ray: ModuleType, folders: list[str]) -> None:
        """Every node must be able to write into the output folders (a shared filesystem)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(num_cpus=0)(_probe_writable)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = {
            n["NodeManagerAddress"]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(folders)
            for n in nodes
        }
        problems = [f"node {ip}: {', '.join(ray.get(ref))}" for ip, ref in refs.items() if ray.get(ref)]
        if problems:
            raise RayUnavailable(
                "the output folder must be on a filesystem every Ray node can write; cannot write "
                + "; ".join(problems)
            )

    def run(self, job: ChunkJob[Any], units: Sequence[WorkUnit[Any]]) -> Iterator[tuple[WorkUnit[Any], list[Any]]]:
        ray = self.connect()
        job_ref = ray.put(job)
        queue: deque[WorkUnit[Any]] = deque(u for u in units if job.resources(u.key) == Resources())
        tasks = [u for u in units if job.resources(u.key) != Resources()]
        running: dict[Any, tuple[Any, WorkUnit[Any]]] = {}
        task_fn = ray.remote(_run_task)
        for unit in tasks:
            wanted = job.resources(unit.key)
            ref = task_fn.options(**task_options(wanted)).remote(job_ref, unit, max(1, int(wanted.num_cpus)))
            running[ref] = (None, unit)
        # Actors hold their CPU for the run; tasks with their own resources keep theirs free.
        reserved = max((job.resources(u.key).num_cpus for u in tasks), default=0.0)
        n_actors = min(len(queue), max(1, int(ray.cluster_resources().get("CPU", 1) - reserved)))
        runner = ray.remote(num_cpus=1)(_UnitRunner)
        actors = [runner.remote(job_ref) for _ in range(n_actors)]
        idle = deque(actors)
        try:
            while queue or running:
                while idle and queue:
                    actor, unit = idle.popleft(), queue.popleft()
                    running[actor.run.remote(unit)] = (actor, unit)
                [ref], _ = ray.wait(list(running), num_returns=1)
                actor, unit = running.pop(ref)
                rows, died = self._result(ray, job, ref, unit, queue)
                if actor is not None:
                    if died:  # a fresh actor takes the dead one's place
                        actors.remove(actor)
                        actor = runner.remote(job_ref)
                        actors.append(actor)
                    idle.append(actor)
                if rows:
                    yield unit, rows
        finally:
            self._stop(ray, running, actors)

    @staticmethod
    def _result(ray: ModuleType, job: ChunkJob[Any], ref: Any, unit: WorkUnit[Any],
                queue: deque[WorkUnit[Any]]) -> tuple[list[Any], bool]:
        """A finished unit's rows, and whether its worker died; a dead worker's unit goes
        back file by file (after_crash)."""
        try:
            return ray.get(ref), False
        except ray.exceptions.RayTaskError as exc:  # an exception the job did not expect: a bug
            raise WorkerError(f"a Ray worker failed on {unit}:\n{exc}") from None
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.OutOfMemoryError, ray.exceptions.NodeDiedError) as exc:
            if getattr(exc, "actor_init_failed", False):
                raise WorkerError(f"a Ray worker could not start:\n{exc}") from None
            reason = f"Ray worker died while processing this file ({type(exc).__name__})"
            again, rows = after_crash(job, unit, reason)
            queue.extendleft(reversed(again))
            return rows, True

    @staticmethod
    def _stop(ray: ModuleType, running: dict[Any, tuple[Any, WorkUnit[Any]]], actors: list[Any]) -> None:
        # Cancelled work raises KeyboardInterrupt in its worker, so `atomic_path` removes
        # its temp file; the actors are then let go.
        for ref in running:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """--backend and --ray_address, the same on every script."""
    parser.add_argument("--backend", choices=BACKENDS, default="local",
                        help="local: --num_workers processes on this machine; ray: a Ray instance "
                        "(--ray_address), on this machine or a cluster")
    parser.add_argument("--ray_address", default=None,
                        help="with --backend ray: HOST:PORT of a running cluster's head, or auto for "
                        "the one this machine belongs to (default: start a local instance)")


def backend_from_args(args: argparse.Namespace, num_workers: int, isolate: bool = False) -> Backend:
    """The backend the flags ask for; a Ray backend is connected now, so a bad setup fails
    (RayUnavailable) before any work."""
    if args.backend == "local":
        if args.ray_address is not None:
            raise RayUnavailable("--ray_address needs --backend ray")
        return LocalBackend(num_workers, isolate=isolate)
    backend = RayBackend(args.ray_address)
    backend.connect()
    return backend


__all__ = [
    "BACKENDS",
    "RayBackend",
    "RayUnavailable",
    "add_backend_arguments",
    "backend_from_args",
    "check_reachable",
    "task_options",
]
