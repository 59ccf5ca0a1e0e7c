"""run.json: the flags, package versions and environment of one run, for reproducibility."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from serec.fileio import write_json_atomic

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
    return write_json_atomic(Path(output_dir) / "run.json", run_record(args, **extra))
