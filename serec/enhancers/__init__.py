"""Speech-enhancement models by name: built-in CPU enhancers and adapters for upstream repos."""

from serec.enhancers.base import (
    EnhancementError,
    Enhancer,
    EnhancerUnavailable,
    ModelsConfigError,
    Option,
)
from serec.enhancers.builtin import BuiltinEnhancer
from serec.enhancers.config import load_models_config
from serec.enhancers.external import SGMSE, CDiffuSE, ExternalEnhancer, StoRM
from serec.enhancers.pretrained import PretrainedEnhancer
from serec.enhancers.registry import (
    available_enhancers,
    create_enhancer,
    enhancer_class,
    register_enhancer,
)

# The built-ins the enhancement driver runs by default, in a stable order: one model per
# family, chosen on 100 real mixtures (BENCHMARKS.md, "The neural zoo"): DeepFilterNet3
# (deep filtering; best single model), GTCRN (mask-based; best of the three light mask
# models on OVR and PESQ), Conv-TasNet (time-domain; wins many low-SNR files that
# DeepFilterNet3 loses), RNNoise (hybrid DSP/RNN) and non-stationary spectral gating (DSP).
# `none` (passthrough) is registered but not a default: its scores would duplicate the
# `noisy` row that every run records anyway; ask for it by name to make "leave it" a label.
DEFAULT_MODELS: tuple[str, ...] = (
    "deepfilternet3",
    "gtcrn",
    "convtasnet",
    "rnnoise",
    "spectral_gating",
)

__all__ = [
    "DEFAULT_MODELS",
    "BuiltinEnhancer",
    "CDiffuSE",
    "ExternalEnhancer",
    "SGMSE",
    "StoRM",
    "Enhancer",
    "EnhancementError",
    "EnhancerUnavailable",
    "ModelsConfigError",
    "Option",
    "PretrainedEnhancer",
    "available_enhancers",
    "create_enhancer",
    "enhancer_class",
    "load_models_config",
    "register_enhancer",
]
