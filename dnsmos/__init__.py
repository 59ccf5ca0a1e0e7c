"""DNSMOS P.835 / P.808 speech-quality scorer on onnxruntime (models from the speechmos wheel)."""

from dnsmos.models import DnsmosModelError, find_model_files
from dnsmos.scorer import DNSMOS, REFERENCE_COLUMNS, ClipScores, prepare_audio

__all__ = [
    "DNSMOS",
    "REFERENCE_COLUMNS",
    "ClipScores",
    "DnsmosModelError",
    "find_model_files",
    "prepare_audio",
]
