"""Tracing the dynamic model's decoding step into an ONNX graph: its KV geometry, the KV layout that reproduces it,
and the traced graph with our ops' function bodies attached (exporters/step.py is the step itself)."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path

import torch

from dyninfer.core.choices import EXPORT_KV_LAYOUTS
from dyninfer.core.errors import DyninferError, option
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import LogitLens
from dyninfer.exporters import attention, fusions, ops
from dyninfer.exporters.graph_tidy import fold_weight_transposes, strip_node_metadata
from dyninfer.exporters.step import DynamicStep, buffered_step_problem, rotary_in_attention_problem, step_attention
from dyninfer.runtime.dynamic import DynamicModel
from dyninfer.runtime.package_format import EXITS_DISABLED, input_names, output_names

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@contextlib.contextmanager
def quiet_exporters():
    """The exporters' warnings (tracer notes, torchvision absent, axis renames) are not the user's
    business: they would bury our progress lines. Real failures still raise."""
    loggers = [logging.getLogger(name) for name in ("torch", "optimum", "transformers", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _example_inputs(lm, geometry, batch: int, new: int, past_len: int, dtype, kv_layout: str) -> tuple:
    """Example step inputs; sizes > 1 and distinct, so the tracer keeps every dimension symbolic (a buffer's
    capacity is past_len + new + 2)."""
    ids = torch.randint(0, lm.vocab_size, (batch, new))
    positions = (torch.arange(past_len + new),) if kv_layout == "buffer" else ()
    length = past_len + new + 2 if kv_layout == "buffer" else past_len
    past = tuple(torch.randn(batch, heads, length, dim, dtype=dtype) for heads, dim in geometry for _ in range(2))
    return (ids, torch.tensor(EXITS_DISABLED), *positions), past


def kv_geometry(lm) -> list[tuple[int, int]]:
    """(KV heads, head dim) per layer, read from a one-token probe of each layer's cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        hidden = lm.embed_at(torch.zeros(1, 1, dtype=torch.long), 0)
        for index in range(lm.num_layers):
            lm.layer_at(index, hidden, 0, cache)
    return [(layer.keys.shape[1], layer.keys.shape[3]) for layer in cache.layers]


def export_step_onnx(
    dynamic: DynamicModel,
    path: Path,
    geometry: list[tuple[int, int]],
    dtype: str = "fp32",
    kv_layout: str = "concat",
    rotary_in_attention: bool = False,
) -> dict:
    """Trace the dynamic model's decoding step and save it (weights as external data) at `path`; `geometry`:
    its `kv_geometry`. Returns what was fused (exporters/fusions.py): node counts, and the norm classes left as
    plain ops."""
    import onnx
    from torch.export import Dim

    lm, lens = dynamic.lm, dynamic.lens
    torch_dtype = DTYPES[dtype]
    if torch_dtype != torch.float32:  # trace a converted copy; the loaded model stays fp32
        lm = LayeredModel(copy.deepcopy(lm.model).to(torch_dtype))
        lens = copy.deepcopy(lens).to(torch_dtype) if isinstance(lens, torch.nn.Module) else LogitLens(lm)
        dynamic = DynamicModel(lm, dynamic.policy, lens, dynamic.classifier)
    step = DynamicStep(dynamic, kv_layout, rotary_in_attention).eval()
    batch, new = Dim("batch", min=1, max=256), Dim("sequence", min=1, max=65536)
    inputs, past = _example_inputs(lm, geometry, 2, 3, 4, torch_dtype, kv_layout)
    if kv_layout == "buffer":
        capacity = Dim("capacity", min=1, max=65536)
        shapes = ({0: batch, 1: new}, None, ({0: Dim("total", min=1, max=65536)}, *({0: batch, 2: capacity} for _ in past)))
    else:
        shapes = ({0: batch, 1: new}, None, tuple({0: batch, 2: Dim("past", min=0, max=65536)} for _ in past))
    config = lm.model.config
    try:
        with torch.no_grad(), quiet_exporters(), step_attention(lm, kv_layout), fusions.fused_norms(lm.model) as norms:
            program = torch.onnx.export(
                step,
                (*inputs, *past),
                dynamic_shapes=shapes,
                input_names=input_names(lm.num_layers, kv_layout),
                output_names=output_names(lm.num_layers),
                custom_translation_table=ops.translation_table() | attention.translation_table() | fusions.norm_translation_table(),
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise DyninferError(
            f"ONNX export does not apply to {config.model_type}: its decoding step does not trace "
            f"({' '.join(str(exc).split())[:300]}); the other stages work"
        ) from exc
    model = program.model_proto
    ops.add_function_definitions(model)
    strip_node_metadata(model)
    fold_weight_transposes(model)
    fused = {
        "rms_norm": norms.fused,
        "skip_rms_norm": fusions.fuse_skip_norms(model),
        "merged_matmuls": fusions.merge_sibling_matmuls(model),
        "rotary_in_attention": rotary_in_attention,
        "norms_left_unfused": sorted(norms.left),
    }
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024
    )
    return fused


def choose_kv_layout(
    dynamic: DynamicModel, geometry: list[tuple[int, int]], provider: str, dtype: str, wanted: str = "auto"
) -> tuple[str, str | None]:
    """The package's KV layout and, when it is not the buffered one, why. "auto" takes the buffer wherever it
    reproduces the model's step; "buffer" refuses a model where it does not. `geometry`: the model's `kv_geometry`."""
    if wanted not in EXPORT_KV_LAYOUTS:
        raise DyninferError(f"{option('kv_layout')} must be one of {', '.join(EXPORT_KV_LAYOUTS)}, got '{wanted}'")
    if wanted == "concat":
        return "concat", None
    if provider == "cuda" and dtype == "fp32":
        problem = "ONNX Runtime's CUDA GroupQueryAttention computes in fp16 or bf16 only (export fp16 for it)"
    else:
        problem = buffered_step_problem(dynamic, geometry)
    if problem is None:
        return "buffer", None
    if wanted == "buffer":
        raise DyninferError(f"the buffered KV layout does not fit this model: {problem}; export with {option('kv_layout')} concat or auto")
    return "concat", f"the KV cache is concatenated each step, not preallocated: {problem}"


def choose_rotary(dynamic: DynamicModel, geometry: list[tuple[int, int]], kv_layout: str) -> tuple[bool, str | None]:
    """Whether the step's attention op rotates queries and keys (one kernel instead of the rotary's dozen nodes a
    layer) and, when it does not in the buffered layout, why."""
    if kv_layout != "buffer":
        return False, None
    problem = rotary_in_attention_problem(dynamic, geometry)
    return problem is None, None if problem is None else f"the rotary embedding runs as plain ops: {problem}"
