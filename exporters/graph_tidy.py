"""Rewrites of an exported graph that change no result but what ONNX Runtime reads, stores and quantizes.

- `fold_weight_transposes`: torch's exporter writes a projection inside the exits' `If` branches as
  MatMul(x, Transpose(W)) with W an initializer of the main graph. ONNX Runtime's session folds that Transpose at
  load (checked on the optimized graph), but its weight quantizer, which runs before and wants a constant weight,
  leaves the MatMul in float. Folding stores Wᵀ once instead, so the quantizer sees it.
- `strip_node_metadata`: torch records a Python stack trace on every node (`pkg.torch.onnx.stack_trace`), about
  46 KB a node inside the branches: most of model.onnx, parsed at every session load, and nothing ONNX Runtime
  uses.
"""

from __future__ import annotations


def subgraphs(node) -> list:
    """The graphs a node holds (an `If`'s branches, a loop's body)."""
    import onnx

    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH] + [g for a in node.attribute for g in a.graphs]


def all_graphs(graph) -> list:
    """`graph` and every graph nested in its nodes."""
    out = [graph]
    for node in graph.node:
        for sub in subgraphs(node):
            out += all_graphs(sub)
    return out


def strip_node_metadata(model) -> int:
    """Drop every node's metadata_props (main graph, subgraphs, functions); returns the bytes dropped."""
    dropped = 0
    nodes = [node for graph in all_graphs(model.graph) for node in graph.node]
    nodes += [node for function in model.functions for node in function.node]
    for node in nodes:
        dropped += sum(len(p.key) + len(p.value) for p in node.metadata_props)
        del node.metadata_props[:]
    return dropped


def fold_weight_transposes(model) -> int:
    """Replace each Transpose of a main-graph initializer (anywhere in the graph) by a transposed initializer,
    shared by every Transpose of the same weight with the same permutation; an initializer no node reads any more
    is dropped. Returns how many Transpose nodes were folded."""
    from onnx import helper, numpy_helper

    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    folded: dict[tuple[str, tuple[int, ...]], str] = {}
    count = 0

    def fold(graph) -> None:
        nonlocal count
        renamed: dict[str, str] = {}
        keep = []
        # an outer-scope name may be shadowed by a local initializer: fold only what the main graph owns
        local = {t.name for t in graph.initializer} if graph is not model.graph else set()
        for node in graph.node:
            if node.op_type == "Transpose" and node.input[0] in initializers and node.input[0] not in local:
                weight = initializers[node.input[0]]
                perm = next((tuple(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)
                perm = perm or tuple(reversed(range(len(weight.dims))))
                key = (weight.name, perm)
                if key not in folded:
                    folded[key] = f"{weight.name}.transposed" + ("" if perm == (1, 0) else "_" + "".join(map(str, perm)))
                    array = numpy_helper.to_array(weight, base_dir="").transpose(perm).copy()
                    model.graph.initializer.append(numpy_helper.from_array(array, folded[key]))
                renamed[node.output[0]] = folded[key]
                count += 1
                continue
            keep.append(node)
        del graph.node[:]
        graph.node.extend(keep)
        _rename_inputs(graph, renamed)
        for node in graph.node:
            for sub in subgraphs(node):
                fold(sub)

    fold(model.graph)
    if count:
        _drop_unread_initializers(model)
    return count


def _rename_inputs(graph, renamed: dict[str, str]) -> None:
    """Point every read of a name in `renamed` (in `graph`, its subgraphs and its outputs) at the new name."""
    if not renamed:
        return
    for g in all_graphs(graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name in renamed:
                    node.input[i] = renamed[name]
    from onnx import helper

    for output in graph.output:  # a folded Transpose that was a graph output keeps its name through an Identity
        if output.name in renamed:
            graph.node.append(helper.make_node("Identity", [renamed[output.name]], [output.name]))


def _drop_unread_initializers(model) -> None:
    read = {name for graph in all_graphs(model.graph) for node in graph.node for name in node.input}
    read |= {name for function in model.functions for node in function.node for name in node.input}
    read |= {output.name for output in model.graph.output}
    kept = [tensor for tensor in model.graph.initializer if tensor.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
