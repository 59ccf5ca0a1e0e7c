"""Find, check and load the DNSMOS ONNX models, and split the primary model for shared windows.

By default the models are the ONNX files bundled in the installed `speechmos` wheel
(byte-identical to Microsoft's). A model folder may be given instead, laid out like
Microsoft's DNS-Challenge repo (`DNSMOS/`, `pDNSMOS/`), like speechmos (`dnsmos_models/`,
`pdnsmos_models/`) or holding the regular files directly.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from dnsmos.features import MEL_FRAMES, N_MELS
from dnsmos.windows import WINDOW_SAMPLES

log = logging.getLogger(__name__)

# A folder of DNSMOS models every step scores with when none is passed (README: DNSMOS).
MODEL_DIR_ENV = "SEREC_DNSMOS_MODEL_DIR"
PRIMARY_FILE = "sig_bak_ovr.onnx"
P808_FILE = "model_v8.onnx"
MODEL_INPUT = "input_1"

# Inside sig_bak_ovr.onnx (regular and personalized share the graph): the 320-sample frames
# the model cuts from a window, and the feature map after its sixth convolution.
TRUNK_INPUT = "mos_estimator_logpow/concat:0"
TRUNK_OUTPUT = "mos_estimator_logpow/conv2d_5/Relu:0"
# The trunk's time-mixing layers, in order: (op, kernel, strides, pads). Four 3x3 convs at
# frame rate, 2x2 pool, conv, 2x2 pool, conv. Everything else in the trunk is per frame.
TRUNK_LAYERS = (
    *[("Conv", (3, 3), (1, 1), (1, 1, 1, 1))] * 4,
    ("MaxPool", (2, 2), (2, 2), ()),
    ("Conv", (3, 3), (1, 1), (1, 1, 1, 1)),
    ("MaxPool", (2, 2), (2, 2), ()),
    ("Conv", (3, 3), (1, 1), (1, 1, 1, 1)),
)
TRUNK_PER_FRAME_OPS = {"Transpose", "Mul", "Add", "Sqrt", "Pow", "Max", "Log", "Div", "Unsqueeze", "Relu"}


class DnsmosModelError(Exception):
    """A DNSMOS model file that is missing or not the expected model."""


@dataclass(frozen=True)
class ModelVariant:
    """One DNSMOS flavour: where its primary model lives and its MOS polynomials."""

    name: str
    primary_dirs: tuple[str, ...]
    # numpy poly1d coefficients (highest power first) mapping raw outputs to MOS.
    sig_poly: tuple[float, ...]
    bak_poly: tuple[float, ...]
    ovr_poly: tuple[float, ...]


REGULAR = ModelVariant(
    name="dnsmos",
    primary_dirs=("dnsmos_models", "DNSMOS", ""),
    sig_poly=(-0.08397278, 1.22083953, 0.0052439),
    bak_poly=(-0.13166888, 1.60915514, -0.39604546),
    ovr_poly=(-0.06766283, 1.11546468, 0.04602535),
)
PERSONALIZED = ModelVariant(
    name="dnsmos_personalized",
    primary_dirs=("pdnsmos_models", "pDNSMOS"),
    sig_poly=(-0.01019296, 0.02751166, 1.19576786, -0.24348726),
    bak_poly=(-0.04976499, 0.44276479, -0.1644611, 0.96883132),
    ovr_poly=(-0.00533021, 0.005101, 1.18058466, -0.11236046),
)
P808_DIRS = ("dnsmos_models", "DNSMOS", "")


@dataclass(frozen=True)
class ModelFiles:
    primary: Path
    p808: Path


def bundled_model_dir() -> Path | None:
    """The folder of the installed speechmos package (it holds dnsmos_models/), or None."""
    try:
        return Path(str(importlib.resources.files("speechmos")))
    except ModuleNotFoundError:
        return None


def _find(name: str, base: Path, subdirs: tuple[str, ...], searched: list[Path]) -> Path | None:
    for sub in subdirs:
        candidate = base / sub / name
        searched.append(candidate)
        if candidate.is_file():
            return candidate
    return None


def find_model_files(personalized: bool, model_dir: str | os.PathLike[str] | None = None) -> ModelFiles:
    """The primary and P.808 model paths; DnsmosModelError listing every place looked at.

    Without `model_dir`, the folder in the SEREC_DNSMOS_MODEL_DIR environment variable, else
    the models bundled with speechmos.
    """
    variant = PERSONALIZED if personalized else REGULAR
    bundled = bundled_model_dir()
    if model_dir is None:
        model_dir = os.environ.get(MODEL_DIR_ENV) or None
    base = Path(model_dir) if model_dir is not None else bundled
    searched: list[Path] = []
    primary = p808 = None
    if base is not None:
        primary = _find(PRIMARY_FILE, base, variant.primary_dirs, searched)
        p808 = _find(P808_FILE, base, P808_DIRS, searched)
    if primary is None or p808 is None:
        where = "\n  ".join(str(p) for p in searched) or "(nothing: speechmos is not installed)"
        hint = (
            f"the speechmos package bundles them (at {bundled}/dnsmos_models and "
            f"{bundled}/pdnsmos_models); omit the model folder to use those"
            if model_dir is not None and bundled is not None
            else "install speechmos (`pip install speechmos`, it bundles them) or pass a model "
            "folder (--dnsmos_model_dir) laid out as DNSMOS/ + pDNSMOS/"
        )
        missing = PRIMARY_FILE if primary is None else P808_FILE
        raise DnsmosModelError(
            f"{variant.name} model file {missing} not found; looked in:\n  {where}\n{hint}"
        )
    return ModelFiles(primary, p808)


def default_providers() -> list[str]:
    """CUDA when onnxruntime has it, else CPU (never the Azure provider ort also lists)."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(
    model: str | bytes, num_threads: int | None, providers: list[str]
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(model, sess_options=options, providers=providers)


def _dims(value: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    return tuple(
        d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim
    )


def load_checked(path: Path, input_dims: tuple[int, ...], output_dims: tuple[int, ...]) -> onnx.ModelProto:
    """The ONNX model at `path`; DnsmosModelError unless it maps [N, *input_dims] to [N, *output_dims]."""
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError, onnx's own errors, OSError
        raise DnsmosModelError(f"{path}: cannot be read as an ONNX model ({exc})") from exc
    constants = {t.name for t in model.graph.initializer}
    inputs = [(v.name, _dims(v)) for v in model.graph.input if v.name not in constants]
    outputs = [_dims(v) for v in model.graph.output]
    expected_in, expected_out = (MODEL_INPUT, input_dims), output_dims
    if (
        len(inputs) != 1
        or len(outputs) != 1
        or (inputs[0][0], inputs[0][1][1:]) != expected_in
        or outputs[0][1:] != expected_out
    ):
        raise DnsmosModelError(
            f"{path}: not the expected DNSMOS model: takes {inputs} -> {outputs}, expected "
            f"{MODEL_INPUT} [N, {', '.join(map(str, input_dims))}] -> "
            f"[N, {', '.join(map(str, output_dims))}]"
        )
    return model


PRIMARY_IO = ((WINDOW_SAMPLES,), (3,))
P808_IO = ((MEL_FRAMES, N_MELS), (1,))


def _subgraph(model: onnx.ModelProto, start: str, start_dims: list, end: str) -> tuple[onnx.ModelProto, list]:
    """The nodes computing `end` from `start` (and constants) as a standalone model."""
    producer = {out: node for node in model.graph.node for out in node.output}
    needed: set[int] = set()
    stack = [end]
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if tensor == start or node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(node.input)
    nodes = [n for n in model.graph.node if id(n) in needed]
    used = {name for n in nodes for name in n.input}
    graph = helper.make_graph(
        nodes,
        f"{model.graph.name}_{end}",
        [helper.make_tensor_value_info(start, TensorProto.FLOAT, start_dims)],
        [helper.make_tensor_value_info(end, TensorProto.FLOAT, None)],
        [t for t in model.graph.initializer if t.name in used],
    )
    sub = helper.make_model(graph, opset_imports=model.opset_import)
    sub.ir_version = model.ir_version
    return sub, nodes


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """`model`, or a copy of it that also returns the named intermediate tensors."""
    if not tensors:
        return model
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    produced = {out for node in exposed.graph.node for out in node.output}
    for name in tensors:
        if name not in produced:
            raise DnsmosModelError(f"DNSMOS model {model.graph.name} has no tensor {name!r}")
        exposed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return exposed


def _layer_signature(node: onnx.NodeProto) -> tuple:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (
        node.op_type,
        tuple(attrs.get("kernel_shape", ())),
        tuple(attrs.get("strides", ())),
        tuple(attrs.get("pads", ())),
    )


def split_primary(model: onnx.ModelProto, extra_outputs: Sequence[str] = ()) -> tuple[bytes, bytes] | None:
    """(trunk, tail) models of sig_bak_ovr.onnx, or None if its graph is not the known one.

    trunk: frames [N, T, 320] -> feature map [N, 32, T / 4, 40] (T a multiple of 4);
    tail: one window's feature map [N, 32, 225, 40] -> raw [N, 3] (SIG, BAK, OVR), then
    the `extra_outputs` (tensors of the tail, e.g. its pooled and dense activations).
    """
    tensors = {out for node in model.graph.node for out in node.output}
    if TRUNK_INPUT not in tensors or TRUNK_OUTPUT not in tensors:
        log.info("%s: unknown primary graph, scoring whole windows", model.graph.name)
        return None
    trunk, trunk_nodes = _subgraph(model, TRUNK_INPUT, ["N", "T", 320], TRUNK_OUTPUT)
    # The STFT is a kernel-1 convolution over frames: per frame too.
    layers = tuple(
        signature
        for signature in map(_layer_signature, trunk_nodes)
        if signature[0] not in TRUNK_PER_FRAME_OPS and not (signature[0] == "Conv" and signature[1] == (1,))
    )
    if layers != TRUNK_LAYERS:
        log.info("%s: unexpected trunk layers %s, scoring whole windows", model.graph.name, layers)
        return None
    output = model.graph.output[0].name
    tail, _ = _subgraph(model, TRUNK_OUTPUT, ["N", 32, "R", 40], output)
    return trunk.SerializeToString(), with_outputs(tail, extra_outputs).SerializeToString()
