"""What the steps that run enhancers on files (enhancement, routing) share as runner jobs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from serec.audio import AudioError
from serec.enhancers import EnhancementError, Enhancer, create_enhancer
from serec.parallel import ChunkJob, Resources, WorkUnit, chunk_units

T = TypeVar("T")


class EnhancerJob(ChunkJob[T]):
    """A job whose unit key names the enhancer that runs its files.

    Each process builds an enhancer once, on first use, and reuses it for every unit.
    External enhancers start their own subprocess (and GPU) per batch: their units run
    in the calling process.
    """

    recoverable = (EnhancementError, AudioError, RuntimeError, ValueError, OSError)

    def __init__(self, enhancers: Mapping[str, Enhancer], model_configs: Mapping[str, Mapping[str, Any]],
                 device: str, seed: int) -> None:
        self.model_configs = {name: dict(table) for name, table in model_configs.items()}
        self.device = device
        self.seed = seed
        # What one batch of an external model asks a cluster for (its table's num_cpus, num_gpus).
        self.external = {
            name: Resources(float(e.config["num_cpus"]), float(e.config["num_gpus"]))
            for name, e in enhancers.items()
            if e.kind == "external"
        }

    def setup(self, threads: int | None) -> None:
        self._enhancers: dict[str, Enhancer] = {}

    def in_main(self, unit: WorkUnit[T]) -> bool:
        return unit.key in self.external

    def resources(self, key: str) -> Resources:
        return self.external.get(key, Resources())

    def enhancer(self, name: str) -> Enhancer:
        if name not in self._enhancers:
            self._enhancers[name] = create_enhancer(
                name, self.model_configs.get(name), device=self.device, seed=self.seed
            )
        return self._enhancers[name]


def enhancer_units(
    items_by_model: Mapping[str, Sequence[T]], enhancers: Mapping[str, Enhancer], chunk_size: int
) -> list[WorkUnit[T]]:
    """Chunks of each model's files; an external model's are at least its batch (it loads per batch)."""
    units: list[WorkUnit[T]] = []
    for model, items in items_by_model.items():
        enhancer = enhancers.get(model)
        external = enhancer is not None and enhancer.kind == "external"
        units += chunk_units(model, items, max(chunk_size, enhancer.batch_size) if external else chunk_size)
    return units
