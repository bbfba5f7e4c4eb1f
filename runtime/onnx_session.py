"""ONNX Runtime sessions for packages and baselines: the provider asked for, or the CPU with a note saying why.

Numpy, onnx and onnxruntime only (imported on first use): nothing here needs torch.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from dyninfer.core.artifact_paths import inside, relative_inside
from dyninfer.core.choices import PROVIDER_NAMES
from dyninfer.core.errors import DyninferError, check_choice


def session_providers(provider: str) -> list[str]:
    """ONNX Runtime's providers for `provider`, in the order a session tries them (CUDA falls back to the CPU)."""
    check_choice("provider", provider, PROVIDER_NAMES)
    return [PROVIDER_NAMES["cuda"], PROVIDER_NAMES["cpu"]] if provider == "cuda" else [PROVIDER_NAMES["cpu"]]


def create_session(model, provider: str, threads: int | None = None):
    """An InferenceSession for `model` (a path or serialized bytes) on `provider`, falling back
    to CPU; returns (session, why `provider` is not the one running, or None)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not isinstance(model, bytes):
        check_external_data(Path(model))
    wanted = session_providers(provider)
    available = ort.get_available_providers()
    try:
        # A CUDA EP that cannot start logs several lines from C++; our note says it once.
        with silenced_native_stderr(enabled=len(wanted) > 1):
            session = ort.InferenceSession(
                model if isinstance(model, bytes) else str(model), options, providers=[p for p in wanted if p in available]
            )
    except Exception as exc:
        raise DyninferError(f"ONNX Runtime could not load '{model}': {' '.join(str(exc).split())[:300]}") from None
    if wanted[0] not in available:
        return session, f"this onnxruntime build has no {wanted[0]} (install onnxruntime-gpu)"
    if wanted[0] != session.get_providers()[0]:
        return session, f"{wanted[0]} could not start here (no CUDA device or driver)"
    return session, None


def check_external_data(model: Path) -> None:
    """Refuse a graph whose weights live in files outside its folder (an absolute path or `..` in a tensor's
    external-data location, or a link out): ONNX Runtime would read them."""
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:160]
        raise DyninferError(f"'{model}' is not a readable ONNX graph ({reason}); re-run `dyninfer export`") from None
    for tensor in _graph_tensors(proto.graph, [node for function in proto.functions for node in function.node]):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        if not relative_inside(location) or not inside(model.parent, model.parent / location):
            raise DyninferError(
                f"the graph '{model}' reads the weights of {tensor.name!r} from {location!r}, outside its folder; re-run `dyninfer export`"
            )


def _graph_tensors(graph, extra_nodes=()):
    """Every tensor a graph holds: its initializers and the tensors in its nodes' attributes, subgraphs (If branches)
    included."""
    yield from graph.initializer
    for node in [*graph.node, *extra_nodes]:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graph_tensors(subgraph)


@contextlib.contextmanager
def silenced_native_stderr(enabled: bool = True):
    """Discard what native code (ONNX Runtime's C++ logger) writes to file descriptor 2."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
