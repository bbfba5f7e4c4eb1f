"""Fused kernels in the exported step: what onnxruntime-genai's builder emits for a decoder, reached from the family's
own modules and the traced graph, not from a per-family graph builder.

ONNX Runtime's own session optimizations do not find these in a traced graph (checked on its optimized output): an
RMSNorm stays six nodes (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, and the weight's Mul), the residual Add stays
beside it, and projections that read the same input stay separate matrix products. So:

- **RMSNorm** (`fused_norms`, while tracing): each module that computes x / rms(x) * w, or * (1 + w) (Gemma), is
  found by what it computes (a probe with random weights, so a family's class name or attribute layout is not
  needed) and traced as the custom op `dyninfer::rms_norm`, which the exporter turns into ONNX Runtime's
  `SimplifiedLayerNormalization` (CPU and CUDA kernels). A module that computes anything else keeps its own ops.
- **Residual add + RMSNorm** (`fuse_skip_norms`, on the graph): an Add of two tensors of one shape whose sum feeds a
  SimplifiedLayerNormalization becomes one `com.microsoft.SkipSimplifiedLayerNormalization`, which also outputs the
  sum for the residual stream.
- **Projections of one input** (`merge_sibling_matmuls`, on the graph, before quantization): MatMuls of the same
  input by constant weights of the same depth (Q, K and V; gate and up) become one MatMul by the weights side by
  side and a Split: one quantized kernel call instead of two or three, and one read of the input. A weight merged in
  one place is read as the same merged weight wherever a subset of its siblings is used (CALM's propagation branch
  computes K and V only), so no weight is stored twice.

Each fusion changes no result beyond float rounding; the export's verification against torch checks every package.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from dyninfer.exporters.graph_tidy import all_graphs

CONTRIB_DOMAIN = "com.microsoft"

# --- RMSNorm as one node ----------------------------------------------------------------------------------------------


@torch.library.custom_op("dyninfer::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, computed in float32 and returned in x's dtype (as
    ONNX Runtime's SimplifiedLayerNormalization computes it with stash_type 1)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * weight.float()).to(x.dtype)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


def norm_translation_table() -> dict:
    """`dyninfer::rms_norm` -> one `SimplifiedLayerNormalization` node (ONNX Runtime registers it in the ONNX domain)."""
    from onnx.defs import OpSchema
    from onnxscript import values

    float_types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schema = OpSchema(
        "SimplifiedLayerNormalization",
        "",
        1,
        inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("scale", "T")],
        outputs=[OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", float_types, "float tensors")],
        attributes=[
            OpSchema.Attribute("axis", OpSchema.AttrType.INT),
            OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT),
            OpSchema.Attribute("stash_type", OpSchema.AttrType.INT),
        ],
    )
    node = values.Op(values.Opset("", 1), "SimplifiedLayerNormalization", schema)

    def emit(x, weight, eps):
        return node(x, weight, axis=-1, epsilon=eps, stash_type=1)

    return {rms_norm._opoverload: emit}


def _norm_form(module: torch.nn.Module) -> tuple[float, float] | None:
    """(weight offset, eps) when `module` computes x / rms(x) * (offset + weight) over the last axis, else None.
    Probed with a random weight (a freshly initialised norm's weight of ones or zeros cannot tell the forms apart)."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or not isinstance(eps, float):
        return None
    if getattr(module, "bias", None) is not None or any(True for _ in module.children()):
        return None
    generator = torch.Generator().manual_seed(0)
    probe_weight = torch.randn(weight.shape, generator=generator)
    x = torch.randn(2, 3, weight.shape[0], generator=generator)
    try:
        with torch.no_grad():
            out = torch.func.functional_call(module, {"weight": probe_weight}, (x,)).float()
    except Exception:  # a module that is not a plain norm of its input
        return None
    if out.shape != x.shape:
        return None
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    for offset in (0.0, 1.0):
        if torch.allclose(out, normed * (offset + probe_weight), rtol=1e-4, atol=1e-5):
            return offset, eps
    return None


@dataclass
class FusedNorms:
    """What `fused_norms` found: how many modules trace as one node, and the classes left as they are."""

    fused: int = 0
    left: set[str] = field(default_factory=set)


@contextlib.contextmanager
def fused_norms(model: torch.nn.Module):
    """While inside, every RMSNorm of `model` (found by `_norm_form`) calls `rms_norm`; yields a FusedNorms."""
    found = FusedNorms()
    patched = []
    for module in model.modules():
        if "norm" not in type(module).__name__.lower():
            continue
        form = _norm_form(module)
        if form is None:
            found.left.add(type(module).__name__)
            continue
        offset, eps = form

        def forward(x, _module=module, _offset=offset, _eps=eps):
            weight = _module.weight if _offset == 0.0 else _module.weight + _offset
            return rms_norm(x, weight, _eps)

        module.forward = forward
        patched.append(module)
    found.fused = len(patched)
    try:
        yield found
    finally:
        for module in patched:
            del module.forward


# --- graph rewrites --------------------------------------------------------------------------------------------------


def _shapes(model) -> dict[str, tuple]:
    """Value name -> its dims (a symbol or a number each), for the values whose shape the exporter recorded."""
    shapes = {}
    for graph in all_graphs(model.graph):
        for info in [*graph.value_info, *graph.input, *graph.output]:
            tensor = info.type.tensor_type
            if tensor.HasField("shape"):
                shapes[info.name] = tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)
    return shapes


def fuse_skip_norms(model) -> int:
    """Add(a, b) -> SimplifiedLayerNormalization becomes SkipSimplifiedLayerNormalization(a, b, scale), whose fourth
    output is the sum (read by the residual stream), wherever a and b have one recorded rank-3 shape and both nodes are
    in the same graph. Returns how many were fused."""
    from onnx import helper

    shapes = _shapes(model)
    fused = 0
    # nested graphs first: rewriting a graph re-adds its nodes, copying the branches they hold as they are by then
    for graph in reversed(all_graphs(model.graph)):
        producers = {output: node for node in graph.node for output in node.output}
        replaced: dict[int, object] = {}  # id(Add node) -> the fused node
        dropped: set[int] = set()
        for node in graph.node:
            if node.op_type != "SimplifiedLayerNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            add = producers.get(node.input[0])
            if add is None or add.op_type != "Add" or id(add) in replaced:
                continue
            a, b = (shapes.get(name) for name in add.input)
            if a is None or a != b or len(a) != 3:
                continue
            attributes = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
            replaced[id(add)] = helper.make_node(
                "SkipSimplifiedLayerNormalization",
                [add.input[0], add.input[1], node.input[1]],
                [node.output[0], "", "", add.output[0]],
                name=(node.name or add.output[0]) + ".skip",
                domain=CONTRIB_DOMAIN,
                epsilon=attributes.get("epsilon", 1e-5),
            )
            dropped.add(id(node))
        if replaced:
            nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in dropped]
            del graph.node[:]
            graph.node.extend(nodes)
            fused += len(replaced)
    _import_contrib(model, fused)
    return fused


def merge_sibling_matmuls(model) -> int:
    """MatMuls that read one input with constant 2-D weights [K, N_i] of one K and dtype become one MatMul by the
    concatenated weight [K, sum N_i] and a Split into the original outputs. A weight already merged with more
    siblings elsewhere is read through that merged weight (extra Split outputs unused), so each weight is stored once.
    Returns how many MatMuls were merged away."""
    from onnx import numpy_helper

    constants = {t.name: t for t in model.graph.initializer}
    groups = []  # (graph, members): MatMul nodes of one graph that read one input; nested graphs first (as above)
    for graph in reversed(all_graphs(model.graph)):
        by_input: dict[str, list] = {}
        local = {t.name for t in graph.initializer} if graph is not model.graph else set()  # may shadow the main graph's
        for node in graph.node:
            weight_name = node.input[1] if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") else None
            if weight_name in constants and weight_name not in local:
                weight = constants[node.input[1]]
                if len(weight.dims) == 2:
                    by_input.setdefault(node.input[0], []).append(node)
        for members in by_input.values():
            by_depth: dict[tuple, list] = {}
            for node in members:
                weight = constants[node.input[1]]
                by_depth.setdefault((weight.dims[0], weight.data_type), []).append(node)
            groups += [(graph, nodes) for nodes in by_depth.values() if len(nodes) > 1]
    # each weight goes into the largest group it belongs to; a group all of whose weights sit in one larger merged
    # weight reads that one
    owner: dict[str, tuple[str, ...]] = {}
    for _, nodes in sorted(groups, key=lambda g: -len(g[1])):
        names = tuple(n.input[1] for n in nodes)
        if not any(name in owner for name in names):
            for name in names:
                owner[name] = names
    merged: dict[tuple[str, ...], str] = {}
    removed = 0
    rewrites: dict[int, tuple[object, list]] = {}  # id(graph) -> (graph, [(nodes, layout)]): one rewrite per graph
    for graph, nodes in groups:
        names = [n.input[1] for n in nodes]
        layout = owner.get(names[0])
        if layout is None or any(owner.get(name) != layout for name in names):
            continue  # its weights are split across different merges: left as they are
        if layout not in merged:
            arrays = [numpy_helper.to_array(constants[name], base_dir="") for name in layout]
            merged[layout] = "+".join(layout) + ".merged"
            model.graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), merged[layout]))
        rewrites.setdefault(id(graph), (graph, []))[1].append((nodes, layout))
    for graph, merges in rewrites.values():
        removed += _replace_with_splits(graph, merges, merged, constants)
    if removed:
        used = {name for g in all_graphs(model.graph) for node in g.node for name in node.input}
        kept = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return removed


def _replace_with_splits(graph, merges: list, merged: dict, constants: dict) -> int:
    """In one rewrite of `graph` (rewriting copies its nodes), each group of sibling MatMuls becomes one MatMul by its
    merged weight and a Split, placed where the first of them was. Returns how many MatMuls went."""
    from onnx import helper, numpy_helper

    replacement: dict[int, list] = {}  # id(first node of a group) -> its new nodes
    gone: set[int] = set()
    for nodes, layout in merges:
        sizes = [int(constants[name].dims[1]) for name in layout]
        outputs = {n.input[1]: n.output[0] for n in nodes}
        first = nodes[0]
        product = first.output[0] + ".merged"
        split_sizes = f"{merged[layout]}.split"
        if not any(t.name == split_sizes for t in graph.initializer):
            graph.initializer.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), split_sizes))
        replacement[id(first)] = [
            helper.make_node("MatMul", [first.input[0], merged[layout]], [product], name=first.name + ".merged"),
            helper.make_node(
                "Split",
                [product, split_sizes],
                [outputs.get(name) or f"{product}.unused{i}" for i, name in enumerate(layout)],
                name=first.name + ".split",
                axis=-1,
            ),
        ]
        gone |= {id(n) for n in nodes[1:]}
    rewritten = []
    for node in graph.node:
        if id(node) in replacement:
            rewritten += replacement[id(node)]
        elif id(node) not in gone:
            rewritten.append(node)
    del graph.node[:]
    graph.node.extend(rewritten)
    return len(gone)


def _import_contrib(model, fused: int) -> None:
    from onnx import helper

    if fused and not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
