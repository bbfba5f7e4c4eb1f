"""Weight-only quantization of an exported graph with ONNX Runtime's own quantizer (`MatMulNBits`).

Every MatMul whose weight is a constant (the attention and MLP projections, in the exits' branches too, and
an untied head) becomes a MatMulNBits node: `bits`-bit weights with one scale per `block_size` inputs
(symmetric round-to-nearest), run by ONNX Runtime's CPU and CUDA kernels. Activations, the KV cache and the
ai.dyninfer ops keep the graph's dtype. The optimum baseline is quantized by the same call, so that a
quantized package is compared with the plain model at the same precision.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from dyninfer.core.errors import DyninferError, option
from dyninfer.exporters.graph_tidy import all_graphs, fold_weight_transposes, strip_node_metadata, subgraphs
from dyninfer.exporters.quantize_settings import DEFAULT_ACCURACY_LEVEL, check_accuracy_level, check_block_size
from dyninfer.exporters.source_blocks import SOURCE, SourceWeights, carry_source_blocks

WEIGHT_BITS = {"int8": 8, "int4": 4}  # the quantized weight formats (`full`: the graph's own dtype)
METHOD = "onnxruntime MatMulNBits, blockwise symmetric round-to-nearest"


def _matmul_counts(graph) -> dict[str, int]:
    """MatMul and MatMulNBits nodes in `graph` and its subgraphs (the exits' `If` branches)."""
    ops = [node.op_type for g in all_graphs(graph) for node in g.node]
    return {op: ops.count(op) for op in ("MatMul", "MatMulNBits")}


def _gemms_as_matmuls(model) -> int:
    """Rewrite each Gemm whose weight is a constant of the main graph (a head the exporter wrote as
    Gemm(x, W, transB=1)) as a MatMul on the transposed constant, plus its bias: MatMulNBits quantizes MatMuls
    only, and optimum's export writes the same layer as a MatMul. Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    transposed: dict[str, str] = {}
    rewritten = 0

    def visit(graph) -> None:
        nonlocal rewritten
        nodes = []
        for node in graph.node:
            for sub in subgraphs(node):
                visit(sub)
            settings = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            plain = settings.get("alpha", 1.0) == 1.0 and settings.get("beta", 1.0) == 1.0 and not settings.get("transA", 0)
            if node.op_type != "Gemm" or not plain or node.input[1] not in constants:
                nodes.append(node)
                continue
            weight = node.input[1]
            if settings.get("transB", 0):
                if weight not in transposed:
                    transposed[weight] = weight + "_transposed"
                    array = numpy_helper.to_array(constants[weight], base_dir="")
                    model.graph.initializer.append(numpy_helper.from_array(array.T.copy(), transposed[weight]))
                weight = transposed[weight]
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            product = node.output[0] + "_product" if bias else node.output[0]
            nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name + "_matmul"))
            if bias:
                nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=node.name + "_bias"))
            rewritten += 1
        del graph.node[:]
        graph.node.extend(nodes)

    visit(model.graph)
    return rewritten


def prepare_for_quantization(model) -> None:
    """Put a graph (ours or optimum's) in the form in which the quantizer sees every constant weight, so that both
    graphs quantize the same ones: the head too (optimum's tied head is a Transpose of the embedding; ours a Gemm)
    and the weights torch's branches read through a Transpose."""
    strip_node_metadata(model)
    fold_weight_transposes(model)
    _gemms_as_matmuls(model)


@contextlib.contextmanager
def quiet_quantizer():
    """The quantizer logs a line for every node it skips; none of that is the user's business."""
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quantize_weights(
    path: Path, weights: str, block_size: int, accuracy_level: int = DEFAULT_ACCURACY_LEVEL, source: SourceWeights | None = None
) -> dict:
    """Quantize the constant-weight MatMuls of the graph at `path` in place (its external data rewritten beside
    it); returns what was done, for the package manifest. `weights` "source": the source GGUF's own blocks where a
    weight is one of its tensors (`source`), 8-bit round-to-nearest elsewhere."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if weights not in (*WEIGHT_BITS, SOURCE):
        raise DyninferError(f"{option('weights')} must be one of full, {', '.join(WEIGHT_BITS)}, {SOURCE}; got '{weights}'")
    check_block_size(block_size)
    check_accuracy_level(accuracy_level)
    path = Path(path)
    data_files = {
        entry.value
        for tensor in onnx.load(str(path), load_external_data=False).graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    model = onnx.load(str(path))
    prepare_for_quantization(model)
    carried, bits, excluded = {}, WEIGHT_BITS.get(weights, 8), []
    if weights == SOURCE:
        if source is None:
            raise DyninferError(f"{option('weights')} {SOURCE} needs a model loaded from a quantized GGUF file")
        carried = carry_source_blocks(model, source.tensors(), accuracy_level)
        excluded = [node.name for graph in all_graphs(model.graph) for node in graph.node if node.name.endswith((".sums", ".offset"))]
    with quiet_quantizer():
        quantizer = MatMulNBitsQuantizer(
            model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, nodes_to_exclude=excluded
        )
        quantizer.process()
    quantized = quantizer.model.model
    counts = _matmul_counts(quantized.graph)
    if counts["MatMulNBits"] == 0:
        raise DyninferError(
            f"the graph at '{path}' has no MatMul with a constant weight to quantize; export it with {option('weights')} full"
        )
    for name in data_files:
        (path.parent / name).unlink(missing_ok=True)
    location = next(iter(data_files)) if len(data_files) == 1 else path.name + ".data"
    onnx.save_model(quantized, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=1024)
    return {
        "format": weights,
        "bits": 4 if weights == SOURCE else WEIGHT_BITS[weights],
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "method": METHOD if weights != SOURCE else f"the source GGUF's blocks ({source.path.name}); {METHOD} at 8 bits elsewhere",
        "source_blocks": carried,  # block kind -> MatMuls carrying the source's blocks
        "quantized_matmuls": counts["MatMulNBits"],
        "float_matmuls": counts["MatMul"],  # activation x activation (attention), block sums, or weights not stored as constants
    }
