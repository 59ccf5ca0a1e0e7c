"""Enhancers by name: a tiny registry, so a model is added with a decorator, not a dispatcher edit."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from serec.enhancers.base import Enhancer, ModelsConfigError

E = TypeVar("E", bound=type[Enhancer])

_REGISTRY: dict[str, type[Enhancer]] = {}


def register_enhancer(name: str) -> Callable[[E], E]:
    """Class decorator: make an Enhancer subclass available under `name`."""

    def add(cls: E) -> E:
        if name in _REGISTRY:
            raise ValueError(f"enhancer {name!r} is already registered by {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        return cls

    return add


def enhancer_class(name: str, config: Mapping[str, Any] | None = None) -> type[Enhancer]:
    """The implementation behind a model name: `config["type"]` if given, else the name itself."""
    type_name = (config or {}).get("type") or name
    if type_name not in _REGISTRY:
        where = f"type {type_name!r} of model {name!r}" if type_name != name else f"model {name!r}"
        raise ModelsConfigError(
            f"unknown {where}; registered enhancers: {', '.join(available_enhancers())}"
            + ("" if config else " (external variants need a table in --models_config)")
        )
    return _REGISTRY[type_name]


def create_enhancer(
    name: str, config: Mapping[str, Any] | None = None, device: str = "cpu", seed: int = 0
) -> Enhancer:
    """Build the enhancer `name`, configured by its models-config table (None for defaults).

    A config table may pick another implementation with `type`, so several variants of
    one model can run side by side (e.g. `[SGMSE_pc30] type = "SGMSE"`). Nothing heavy
    is loaded here; call `check()` to find out whether it can run.
    """
    return enhancer_class(name, config)(name, config, device=device, seed=seed)


def available_enhancers(models_config: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Registered enhancer names, plus the model names a loaded models config defines."""
    names = sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].kind != "builtin", n.lower()))
    for name in models_config or {}:
        if name not in names:
            names.append(name)
    return names
