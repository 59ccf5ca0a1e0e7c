"""The models config (--models_config): one TOML table per model name, checked before any work."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from serec.enhancers.base import ModelsConfigError, validate_options
from serec.enhancers.registry import enhancer_class

FORMULA_START = ("=", "+", "-", "@")


def load_models_config(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read a models config: `{model name: its table}`, validated against each enhancer.

    A table is named after the model; `type` picks the implementation when the name is
    a variant (`[SGMSE_pc30] type = "SGMSE"`), otherwise the name itself must be a
    registered enhancer. Unknown keys, wrong types and unknown types raise
    ModelsConfigError naming the file, the table and the key. Relative paths (repo,
    ckpt, model_dir, log_file, and python when it contains a "/") are resolved against
    the config file's folder, so a config works from any working directory.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: models config not found")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ModelsConfigError(f"{path}: not valid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelsConfigError(f"{path}: cannot be read: {exc}") from exc

    models: dict[str, dict[str, Any]] = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ModelsConfigError(
                f"{path}: top-level key {name!r} is not a model table; write it inside a [MODEL] table"
            )
        check_model_name(name, path)
        try:
            cls = enhancer_class(name, table)
        except ModelsConfigError as exc:
            raise ModelsConfigError(f"{path}: [{name}] {exc}") from exc
        validate_options(cls, name, table, source=str(path))
        options = cls.all_options()
        resolved = dict(table)
        for key, value in table.items():
            kind = options[key].path
            if kind == "path" or (kind == "command" and "/" in value):
                resolved[key] = str(_resolve(value, path.parent))
        models[name] = resolved
    return models


def check_model_name(name: str, source: str | os.PathLike[str]) -> str:
    """`name` unchanged if it can name a folder inside an output folder, else ModelsConfigError.

    A model's name becomes a folder (`enhanced/<MODEL>/`, deleted by --overwrite) and a CSV
    value, so a path-like name (absolute, `/`, `\\`, `..`, `.`) could reach outside the
    output folder, and one starting with `=`, `+`, `-` or `@` would be read as a formula by
    a spreadsheet (or as a flag on a command line).
    """
    if not name.strip() or name == "." or any(mark in name for mark in ("/", "\\", "..", "\0")):
        raise ModelsConfigError(
            f"{source}: model name [{name}] is empty or path-like (absolute, '.', or contains '/', '\\' or '..'); "
            "a model name becomes a folder name: use letters, digits, '_', '-' and '.'"
        )
    if name.startswith(FORMULA_START):
        raise ModelsConfigError(
            f"{source}: model name [{name}] starts with {name[0]!r}, which spreadsheets read as a "
            "formula; start it with a letter or digit"
        )
    return name


def _resolve(value: str, base: Path) -> Path:
    candidate = Path(value).expanduser()
    return candidate if candidate.is_absolute() else (base / candidate).absolute()
