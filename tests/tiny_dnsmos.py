"""A tiny DNSMOS-shaped ONNX pair for the pipeline's plumbing tests.

The real primary model costs about 1.4 s of CPU per 9 s window, most of a test run. Tests
that check how steps move files and rows (not what DNSMOS says) score with these instead,
through SEREC_DNSMOS_MODEL_DIR (conftest.py): the same inputs, outputs, tensor names of the
embedding and scorer code, a few thousand weights. The real models are checked against
speechmos in test_dnsmos.py and test_dnsmos_embedding.py (marked real_dnsmos).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dnsmos.embedding import EMBEDDING_SIZES, EMBEDDING_TENSORS
from dnsmos.features import MEL_FRAMES, N_MELS
from dnsmos.models import MODEL_INPUT, P808_FILE, PRIMARY_FILE
from dnsmos.windows import WINDOW_SAMPLES

FRAME = 160  # 10 ms at 16 kHz; a window is 901 frames
OPSET = 17


def _const(name: str, values: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def _model(nodes: list, inits: list, input_dims: tuple[int, ...], output_dims: tuple[int, ...]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "tiny_dnsmos",
        [helper.make_tensor_value_info(MODEL_INPUT, TensorProto.FLOAT, ["N", *input_dims])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", *output_dims])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def primary_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Raw SIG, BAK, OVR around (2.6, 3.0, 2.3), a chaotic function of the window's mean log
    power (sin of it times 40), so that which system wins a file looks random, as plumbing
    tests need: several labels in every fold. The 64 "pooled" and 64 "dense" activations
    of the real graph's names come from the frames' log powers and add a little."""
    frames = WINDOW_SAMPLES // FRAME
    pool, dense = EMBEDDING_TENSORS["dnsmos_pool"], EMBEDDING_TENSORS["dnsmos_dense"]
    width = EMBEDDING_SIZES["dnsmos_pool"]
    inits = [
        numpy_helper.from_array(np.array([-1, frames, FRAME], dtype=np.int64), "shape"),
        _const("eps", [1e-6]),
        _const("w1", rng.normal(0, 0.02, (frames, width))),
        _const("w2", rng.normal(0, 0.1, (width, EMBEDDING_SIZES["dnsmos_dense"]))),
        _const("w3", rng.normal(0, 0.001, (EMBEDDING_SIZES["dnsmos_dense"], 3))),
        _const("phase", [40.0, 37.0, 43.0]),
        _const("amplitude", [0.3, 0.3, 0.5]),
        _const("b3", [2.6, 3.0, 2.3]),
    ]
    nodes = [
        helper.make_node("Reshape", [MODEL_INPUT, "shape"], ["framed"]),
        helper.make_node("Mul", ["framed", "framed"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["power"], axes=[2], keepdims=0),
        helper.make_node("Add", ["power", "eps"], ["power_eps"]),
        helper.make_node("Log", ["power_eps"], ["log_power"]),
        helper.make_node("MatMul", ["log_power", "w1"], ["pool_pre"]),
        helper.make_node("Relu", ["pool_pre"], [pool]),
        helper.make_node("MatMul", [pool, "w2"], ["dense_pre"]),
        helper.make_node("Relu", ["dense_pre"], [dense]),
        helper.make_node("MatMul", [dense, "w3"], ["from_dense"]),
        helper.make_node("ReduceMean", ["log_power"], ["mean_log_power"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["mean_log_power", "phase"], ["angle"]),
        helper.make_node("Sin", ["angle"], ["wave"]),
        helper.make_node("Mul", ["wave", "amplitude"], ["swing"]),
        helper.make_node("Add", ["swing", "from_dense"], ["raw"]),
        helper.make_node("Add", ["raw", "b3"], ["output"]),
    ]
    return _model(nodes, inits, (WINDOW_SAMPLES,), (3,))


def p808_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Mean over frames of a projection of the mel features, near 3."""
    inits = [
        _const("w", rng.normal(0, 0.01, (N_MELS, 1))),
        _const("b", [3.2]),
    ]
    nodes = [
        helper.make_node("MatMul", [MODEL_INPUT, "w"], ["projected"]),
        helper.make_node("ReduceMean", ["projected"], ["mean"], axes=[1], keepdims=0),
        helper.make_node("Add", ["mean", "b"], ["output"]),
    ]
    return _model(nodes, inits, (MEL_FRAMES, N_MELS), (1,))


def write_tiny_dnsmos(folder: Path, seed: int = 0) -> Path:
    """Write DNSMOS/sig_bak_ovr.onnx and DNSMOS/model_v8.onnx under `folder`; return `folder`."""
    rng = np.random.default_rng(seed)
    target = folder / "DNSMOS"
    target.mkdir(parents=True, exist_ok=True)
    onnx.save(primary_model(rng), target / PRIMARY_FILE)
    onnx.save(p808_model(rng), target / P808_FILE)
    return folder
