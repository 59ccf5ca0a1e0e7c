"""run.json: the flags, package versions and environment of one run, for reproducibility."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from serec.fileio import write_json_atomic

RUN_JSON = "run.json"

TRACKED_PACKAGES = (
    "serec",
    "numpy",
    "scipy",
    "soundfile",
    "soxr",
    "librosa",
    "pandas",
    "onnxruntime",
    "speechmos",
    "pesq",
    "pystoi",
    "scikit-learn",
    "torch",
    "transformers",
    "pyrnnoise",
    "webrtc-noise-gain",
    "speexdsp-ns",
    "noisereduce",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_record(args: argparse.Namespace | dict[str, Any], **extra: Any) -> dict[str, Any]:
    flags = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "flags": {k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()},
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cwd": os.getcwd(),
        "versions": package_versions(),
        **extra,
    }


def write_run_json(
    output_dir: str | os.PathLike[str], args: argparse.Namespace | dict[str, Any], **extra: Any
) -> Path:
    """Write OUTPUT_DIR/run.json (atomically) and return its path."""
    return write_json_atomic(Path(output_dir) / RUN_JSON, run_record(args, **extra))


# ---------------------------------------------------------------------------------------
# Model settings: what each model's outputs in a folder were made with


class SettingsChanged(ValueError):
    """A model's settings differ from those its existing outputs were made with."""


def settings_record(settings: Mapping[str, Any]) -> dict[str, Any]:
    """{'settings': values, 'hash': 16 hex digits of their canonical JSON}."""
    canonical = json.loads(json.dumps(settings, sort_keys=True, default=str))
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode("utf-8")).hexdigest()
    return {"settings": canonical, "hash": digest[:16]}


def recorded_model_settings(output_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The `model_settings` of OUTPUT_DIR/run.json ({} when absent: a folder from before them)."""
    path = Path(output_dir) / RUN_JSON
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SettingsChanged(f"{path}: unreadable ({exc}); move it away or use --overwrite") from exc
    settings = record.get("model_settings") if isinstance(record, dict) else None
    return settings if isinstance(settings, dict) else {}


def check_model_settings(
    output_dir: str | os.PathLike[str], current: Mapping[str, Mapping[str, Any]]
) -> None:
    """Raise SettingsChanged naming every model whose recorded settings differ from `current`.

    `current` maps a model name to its `settings_record`; models without a record in the
    folder are new there and pass.
    """
    recorded = recorded_model_settings(output_dir)
    changes = []
    for name, record in current.items():
        old = recorded.get(name)
        if not isinstance(old, dict) or old.get("hash") == record["hash"]:
            continue
        before, after = old.get("settings") or {}, record["settings"]
        keys = [
            f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
            for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)
        ]
        changes.append(f"{name} ({'; '.join(keys) or 'settings differ'})")
    if changes:
        raise SettingsChanged(
            f"{output_dir}: outputs there were made with other settings for "
            f"{', '.join(changes)}; use --overwrite to redo "
            f"{'that model' if len(changes) == 1 else 'those models'}, or another output folder"
        )


# Scoring settings shared by every row of a scores.csv (a folder from before they were
# recorded was scored with these).
REFERENCE_SCORING: dict[str, Any] = {"dnsmos_level_db": None, "dnsmos_model_dir": None}


def recorded_dnsmos_level(output_dir: str | os.PathLike[str]) -> float | None:
    """The DNSMOS level (dBFS) OUTPUT_DIR's enhancement run scored at (None: as is, or no record)."""
    path = Path(output_dir) / RUN_JSON
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    level = (record.get("scoring") or {}).get("dnsmos_level_db")
    return None if level is None else float(level)


def check_scoring_settings(output_dir: str | os.PathLike[str], current: Mapping[str, Any]) -> None:
    """Raise SettingsChanged when OUTPUT_DIR's scores were computed with other scoring settings.

    Scores at two DNSMOS levels must never mix in one scores.csv, and --overwrite redoes
    models, not the noisy input's row, so the only way out is another output folder.
    """
    path = Path(output_dir) / RUN_JSON
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SettingsChanged(f"{path}: unreadable ({exc}); move it away") from exc
    recorded = {**REFERENCE_SCORING, **(record.get("scoring") or {})}
    changed = [f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in current.items() if recorded.get(k) != v]
    if changed:
        raise SettingsChanged(
            f"{output_dir}: its scores were computed with other scoring settings ({'; '.join(changed)}); "
            "scores made two ways must not mix in one scores.csv: use another output folder"
        )
