"""A GGUF source's own quantized blocks, carried into the package's MatMulNBits nodes as they are.

When the model was loaded from a quantized GGUF, its float weights are those blocks dequantized. Quantizing them
again, round to nearest onto another int4 grid, loses much of what the blocks kept (on the bundled model: 67% of
positions keep the original's top-1, against 99% on the source's own grid). So each constant-weight MatMul whose
weight equals a GGUF tensor dequantized (matched by value, so no name mapping is needed; llama.cpp's row
permutation of Q and K is tried too) gets those blocks:

- Q8_0 (w = d q, q int8): an 8-bit MatMulNBits, q + 128 with its default zero point 128; exact.
- Q4_0 (w = d (q - 8), q in 0..15): a 4-bit MatMulNBits with its default zero point 8; exact.
- Q4_1 (w = d q + m): MatMulNBits' fast kernels take integer zero points only, and -m/d is not one. With the
  default zero point 8, w = d (q - 8) + (m + 8 d), so
      A W^T = MatMulNBits(A; q, d) + (A S) C
  with S [K, K/32] summing each block of A's inputs and C [K/32, N] = (m + 8 d) transposed: two small float
  MatMuls beside the int4 one (K/32 x N multiply-adds a row, 3% of the int4 product's), exact at accuracy
  level 0; at level 4 only the int8 rounding of A's blocks remains, as in any int4 graph there.

Blocks of other types (k-quants, whose sub-blocks have 6-bit scales) are not carried; their weights, and any
constant-weight MatMul no GGUF tensor matches (a tuned lens's translators), are quantized by ONNX Runtime's
quantizer at 8 bits, which keeps them within int8's rounding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyninfer.core.errors import DyninferError
from dyninfer.exporters.graph_tidy import all_graphs

BLOCK = 32  # Q4_0, Q4_1 and Q8_0 blocks hold 32 weights
SOURCE = "source"  # weights that keep the source GGUF's own blocks


@dataclass
class SourceTensor:
    """One GGUF tensor's blocks, rows in the order of the model's weight (llama.cpp permutes Q's and K's rows)."""

    name: str
    kind: str  # Q4_0, Q4_1 or Q8_0
    scales: np.ndarray  # [rows, K / 32] float32: d
    quants: np.ndarray  # [rows, K] uint8: q (4-bit: 0..15; 8-bit: the int8 value + 128)
    minimums: np.ndarray | None = None  # [rows, K / 32] float32: m (Q4_1)


def _fingerprint(matrix: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(matrix, dtype=np.float32).tobytes()).hexdigest()


def _row_orders(name: str, rows: int, heads: tuple[int, int] | None) -> list[np.ndarray]:
    """The row orders a weight of this tensor may have in the model: as stored, and for attention Q and K, undoing
    llama.cpp's interleaving of each head's rotary halves (as transformers' GGUF loader does)."""
    orders = [np.arange(rows)]
    if heads is not None and (".attn_q." in name or ".attn_k." in name):
        for count in sorted(set(heads)):
            if rows % (2 * count) == 0:
                order = np.arange(rows).reshape(count, rows // count // 2, 2).swapaxes(2, 1).reshape(rows)
                orders.append(order)
    return orders


def _decode(tensor, kind: str) -> SourceTensor:
    """The blocks of a GGUF tensor (rows of raw bytes) as scales, minimums and quants."""
    raw = np.asarray(tensor.data, dtype=np.uint8)
    rows = raw.shape[0]
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    blocks = raw.reshape(rows, -1, size)
    scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        quants = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8).reshape(rows, -1)
        return SourceTensor(tensor.name, kind, scales, quants)
    offset = 2 if kind == "Q4_0" else 4
    packed = blocks[..., offset:]  # 16 bytes: low nibbles are the block's first 16 weights, high nibbles the rest
    quants = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)
    minimums = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "Q4_1" else None
    return SourceTensor(tensor.name, kind, scales, quants, minimums)


def read_source_blocks(gguf_path: Path, heads: tuple[int, int] | None = None) -> dict[str, SourceTensor]:
    """The carryable GGUF tensors, keyed by the fingerprint of their dequantized float32 weight [rows, K] in each
    row order the model may hold it in (`heads`: attention and KV heads, for Q and K's order)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    found: dict[str, SourceTensor] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in ("Q4_0", "Q4_1", "Q8_0"):
            continue
        source = _decode(tensor, kind)
        weight = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)
        for order in _row_orders(tensor.name, weight.shape[0], heads):
            ordered = SourceTensor(
                source.name,
                kind,
                source.scales[order],
                source.quants[order],
                None if source.minimums is None else source.minimums[order],
            )
            found[_fingerprint(weight[order])] = ordered
    return found


@dataclass
class SourceWeights:
    """A quantized GGUF a model was loaded from, and its attention and KV head counts (for Q and K's row order)."""

    path: Path
    heads: tuple[int, int] | None = None

    def tensors(self) -> dict[str, SourceTensor]:
        return read_source_blocks(self.path, self.heads)


def _packed(source: SourceTensor) -> np.ndarray:
    """MatMulNBits' B [N, K / 32, bytes a block]: 4-bit values two a byte, the even one in the low nibble."""
    rows = source.quants.shape[0]
    if source.kind == "Q8_0":
        return source.quants.reshape(rows, -1, BLOCK)
    pairs = source.quants.reshape(rows, -1, BLOCK // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def _block_sum_matrix(k: int) -> np.ndarray:
    """S [K, K / 32]: A S sums each block of A's inputs."""
    return np.kron(np.eye(k // BLOCK, dtype=np.float32), np.ones((BLOCK, 1), dtype=np.float32))


def _nodes_for(node, source: SourceTensor, k: int, accuracy_level: int, names: dict, initializers: list) -> list:
    """The nodes replacing `node` (MatMul(A, W)) with `source`'s blocks, their initializers appended."""
    from onnx import helper, numpy_helper

    n = source.quants.shape[0]
    stem = f"{source.name}.blocks"
    if stem not in names:  # a weight read in several places (the exits' branches) is stored once
        names[stem] = stem
        initializers += [
            numpy_helper.from_array(_packed(source), f"{stem}.quants"),
            numpy_helper.from_array(source.scales.reshape(-1), f"{stem}.scales"),
        ]
        if source.minimums is not None:
            correction = (source.minimums + 8.0 * source.scales).T.copy()  # C [K / 32, N]
            initializers.append(numpy_helper.from_array(correction.astype(np.float32), f"{stem}.offsets"))
    bits = 8 if source.kind == "Q8_0" else 4
    product = node.output[0] if source.minimums is None else node.output[0] + ".int"
    nodes = [
        helper.make_node(
            "MatMulNBits",
            [node.input[0], f"{stem}.quants", f"{stem}.scales"],
            [product],
            name=node.name + ".nbits",
            domain="com.microsoft",
            K=k,
            N=n,
            bits=bits,
            block_size=BLOCK,
            accuracy_level=accuracy_level,
        )
    ]
    if source.minimums is not None:
        sums = f"block_sums.{k}"
        if sums not in names:
            names[sums] = sums
            initializers.append(numpy_helper.from_array(_block_sum_matrix(k), sums))
        nodes += [
            helper.make_node("MatMul", [node.input[0], sums], [node.output[0] + ".sums"], name=node.name + ".sums"),
            helper.make_node(
                "MatMul", [node.output[0] + ".sums", f"{stem}.offsets"], [node.output[0] + ".offset"], name=node.name + ".offset"
            ),
            helper.make_node("Add", [product, node.output[0] + ".offset"], [node.output[0]], name=node.name + ".corrected"),
        ]
    return nodes


def _column_splits(graph, constants) -> dict[str, list[int]]:
    """MatMul output -> the column sizes of the Split that is its only reader, where the projections of one input were
    merged into one (exporters/fusions.py): each part is one source tensor."""
    from onnx import numpy_helper

    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    local = {t.name: t for t in graph.initializer}
    out = {}
    for name, nodes in readers.items():
        split = nodes[0] if len(nodes) == 1 else None
        if split is None or split.op_type != "Split" or len(split.input) < 2:
            continue
        sizes = local.get(split.input[1]) or constants.get(split.input[1])
        axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
        if sizes is not None and axis == -1:
            out[name] = [int(v) for v in numpy_helper.to_array(sizes)]
    return out


def _parts(array: np.ndarray, sizes: list[int] | None) -> list[np.ndarray]:
    """The weight [K, N] as its merged projections' column blocks (itself when it was not merged)."""
    if not sizes or sum(sizes) != array.shape[1]:
        return [array]
    return np.split(array, np.cumsum(sizes)[:-1], axis=1)


def _joined(parts: list[SourceTensor | None]) -> SourceTensor | None:
    """One tensor of merged projections' blocks, rows side by side; None unless every part is carried, of one kind."""
    if not parts or any(p is None for p in parts) or len({p.kind for p in parts}) != 1:
        return None
    if len(parts) == 1:
        return parts[0]
    minimums = None if parts[0].minimums is None else np.concatenate([p.minimums for p in parts])
    return SourceTensor(
        "+".join(p.name for p in parts),
        parts[0].kind,
        np.concatenate([p.scales for p in parts]),
        np.concatenate([p.quants for p in parts]),
        minimums,
    )


def carry_source_blocks(model, sources: dict[str, SourceTensor], accuracy_level: int) -> dict:
    """Replace every constant-weight MatMul of `model` (an onnx ModelProto prepared for quantization) whose weight is
    a source tensor dequantized with MatMulNBits on that tensor's blocks. Returns counts by kind."""
    from onnx import numpy_helper

    constants = {t.name: t for t in model.graph.initializer}
    fingerprints: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    added: list = []
    counts: dict[str, int] = {}
    # nested graphs first: rewriting a graph re-adds its nodes, copying the branches they hold as they are by then
    for graph in reversed(all_graphs(model.graph)):
        nodes = []
        splits = _column_splits(graph, constants)
        for node in graph.node:
            weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
            if weight not in constants:
                nodes.append(node)
                continue
            if weight not in fingerprints:
                array = numpy_helper.to_array(constants[weight], base_dir="")
                fits = array.ndim == 2 and array.shape[0] % BLOCK == 0
                fingerprints[weight] = [_fingerprint(part.T) for part in _parts(array, splits.get(node.output[0]))] if fits else []
            source = _joined([sources.get(f) for f in fingerprints[weight]])
            if source is None:
                nodes.append(node)
                continue
            nodes += _nodes_for(node, source, int(constants[weight].dims[0]), accuracy_level, names, added)
            counts[source.kind] = counts.get(source.kind, 0) + 1
        del graph.node[:]
        graph.node.extend(nodes)
    if not counts:
        raise DyninferError("no weight of the exported graph matches a Q4_0, Q4_1 or Q8_0 tensor of the source GGUF")
    model.graph.initializer.extend(added)
    used = {name for graph in all_graphs(model.graph) for node in graph.node for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return counts
