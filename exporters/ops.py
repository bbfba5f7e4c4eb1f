"""dyninfer's custom ONNX ops: the exit decision and the fused confidence measures.

Each op lives in our own domain (`ai.dyninfer`) and is *defined* as an ONNX function made
of standard ops, stored in the model file. ONNX Runtime inlines model-local functions when
it loads the model, so stock ONNX Runtime runs them on any execution provider (CUDA
included) with no compiled library, while the saved graph still shows one named node per
exit decision.

Route (found while building export; docs/export.md): on the torch side each op is a `torch.library` custom op with a
reference implementation (used when tracing and by the parity tests); the exporter's
`custom_translation_table` turns each into a single node of our domain, and
`add_function_definitions` attaches the function bodies afterwards. Mapping the ops to
onnxscript `@script` functions instead fails in the exporter's inliner (torch 2.13 /
onnxscript 0.7.2).
"""

from __future__ import annotations

import torch

from dyninfer.early_exit.confidence import from_logits
from dyninfer.early_exit.rule import batch_leaves
from dyninfer.exporters.graph_tidy import all_graphs

DOMAIN = "ai.dyninfer"
DOMAIN_VERSION = 1
_STD_OPSET = 18


# --- torch side ------------------------------------------------------------------------


@torch.library.custom_op("dyninfer::exit_gate", mutates_args=())
def exit_gate(confidence: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """True when every row's confidence reaches the threshold (the exit rule's batch form, early_exit/rule.py)."""
    return batch_leaves(confidence, threshold)


@exit_gate.register_fake
def _(confidence, threshold):
    return torch.empty((), dtype=torch.bool)


# The head measures as ops, each the torch runtime's own function (early_exit/confidence.py).
@torch.library.custom_op("dyninfer::softmax_confidence", mutates_args=())
def softmax_confidence(logits: torch.Tensor) -> torch.Tensor:
    return from_logits("softmax", logits)


@torch.library.custom_op("dyninfer::margin_confidence", mutates_args=())
def margin_confidence(logits: torch.Tensor) -> torch.Tensor:
    return from_logits("margin", logits)


@torch.library.custom_op("dyninfer::entropy_confidence", mutates_args=())
def entropy_confidence(logits: torch.Tensor) -> torch.Tensor:
    return from_logits("entropy", logits)


for _op in (softmax_confidence, margin_confidence, entropy_confidence):

    @_op.register_fake
    def _(logits):
        return logits.new_empty(logits.shape[:-1], dtype=torch.float32)


LOGIT_CONFIDENCE = {"softmax": softmax_confidence, "margin": margin_confidence, "entropy": entropy_confidence}
_OP_NAMES = {
    exit_gate: "ExitGate",
    softmax_confidence: "SoftmaxConfidence",
    margin_confidence: "MarginConfidence",
    entropy_confidence: "EntropyConfidence",
}


# --- exporter side ----------------------------------------------------------------------


def translation_table() -> dict:
    """torch custom op -> a function that emits one `ai.dyninfer` node in the exported graph."""
    from onnxscript import values

    opset = values.Opset(DOMAIN, DOMAIN_VERSION)
    table = {}
    for torch_op, name in _OP_NAMES.items():
        node = values.Op(opset, name, _schema(name))

        def emit(*inputs, _node=node):
            return _node(*inputs)

        table[torch_op._opoverload] = emit
    return table


_SIGNATURES = {  # op name -> (inputs, outputs); every tensor is float except the gate's boolean decision
    "ExitGate": (("confidence", "threshold"), ("exit",)),
    "SoftmaxConfidence": (("logits",), ("confidence",)),
    "MarginConfidence": (("logits",), ("confidence",)),
    "EntropyConfidence": (("logits",), ("confidence",)),
}


def _schema(name: str):
    """An OpSchema for our op, so the exporter's graph builder can emit it as a plain node."""
    from onnx.defs import OpSchema

    inputs, outputs = _SIGNATURES[name]
    float_types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    return OpSchema(
        name,
        DOMAIN,
        DOMAIN_VERSION,
        inputs=[OpSchema.FormalParameter(i, "T") for i in inputs],
        outputs=[OpSchema.FormalParameter(o, "B" if o == "exit" else "tensor(float)") for o in outputs],
        type_constraints=[("T", float_types, "float tensors"), ("B", ["tensor(bool)"], "the decision")],
    )


def function_protos() -> list:
    """The standard-op bodies of every `ai.dyninfer` op, as ONNX functions."""
    from onnx import TensorProto, helper

    std = helper.make_opsetid("", _STD_OPSET)
    n = helper.make_node
    axes_last = helper.make_tensor("axes", TensorProto.INT64, [1], [-1])

    def const(name, value, dtype=TensorProto.FLOAT):
        return n("Constant", [], [name], value=helper.make_tensor(name, dtype, [], [value]))

    def probs_nodes():
        return [n("Cast", ["logits"], ["x"], to=TensorProto.FLOAT), n("Softmax", ["x"], ["p"], axis=-1)]

    gate = helper.make_function(
        DOMAIN,
        "ExitGate",
        ["confidence", "threshold"],
        ["exit"],
        [
            n("ReduceMin", ["confidence"], ["lowest"], keepdims=0),
            n("Cast", ["threshold"], ["thr"], to=TensorProto.FLOAT),
            n("GreaterOrEqual", ["lowest", "thr"], ["exit"]),
        ],
        [std],
    )
    softmax = helper.make_function(
        DOMAIN,
        "SoftmaxConfidence",
        ["logits"],
        ["confidence"],
        probs_nodes()
        + [
            n("Constant", [], ["axes"], value=axes_last),
            n("ReduceMax", ["p", "axes"], ["confidence"], keepdims=0),
        ],
        [std],
    )
    margin = helper.make_function(
        DOMAIN,
        "MarginConfidence",
        ["logits"],
        ["confidence"],
        probs_nodes()
        + [
            n("Constant", [], ["k"], value=helper.make_tensor("k", TensorProto.INT64, [1], [2])),
            n("TopK", ["p", "k"], ["top", "top_index"], axis=-1),
            n("Split", ["top"], ["first", "second"], axis=-1, num_outputs=2),
            n("Sub", ["first", "second"], ["gap"]),
            n("Constant", [], ["axes"], value=axes_last),
            n("Squeeze", ["gap", "axes"], ["confidence"]),
        ],
        [std],
    )
    entropy = helper.make_function(
        DOMAIN,
        "EntropyConfidence",
        ["logits"],
        ["confidence"],
        probs_nodes()
        + [
            const("tiny", 1e-30),
            n("Max", ["p", "tiny"], ["clamped"]),
            n("Log", ["clamped"], ["log_p"]),
            n("Mul", ["p", "log_p"], ["plogp"]),
            n("Constant", [], ["axes"], value=axes_last),
            n("ReduceSum", ["plogp", "axes"], ["neg_entropy"], keepdims=0),
            n("Shape", ["x"], ["shape"], start=-1),
            n("Cast", ["shape"], ["vocab"], to=TensorProto.FLOAT),
            n("Log", ["vocab"], ["log_vocab"]),
            n("Div", ["neg_entropy", "log_vocab"], ["scaled"]),
            const("one", 1.0),
            n("Add", ["one", "scaled"], ["confidence"]),
        ],
        [std],
    )
    return [gate, softmax, margin, entropy]


def add_function_definitions(model) -> None:
    """Attach the `ai.dyninfer` function bodies to an exported onnx.ModelProto (in place)."""
    from onnx import helper

    present = {(f.domain, f.name) for f in model.functions}
    for function in function_protos():
        if (function.domain, function.name) not in present:
            model.functions.append(function)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))


def custom_nodes(model) -> list:
    """Every node of our domain in the model, including inside `If` branches."""
    return [node for graph in all_graphs(model.graph) for node in graph.node if node.domain == DOMAIN]
