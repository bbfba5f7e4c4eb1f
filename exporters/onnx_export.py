"""`dyninfer export`: the calibrated dynamic model as an ONNX Runtime package.

The package (default `ARTIFACT/onnx/`) holds
  model.onnx (+ model.onnx.data)  one decoding step with KV cache, exits as `If` branches,
                                  exit decisions as `ai.dyninfer` custom-op nodes (functions);
  dyninfer-onnx.json              the package manifest (geometry, policy, files, checks);
  source-artifact.json            a copy of the artifact's manifest;
  tokenizer files and config.json;
  baseline/                       the plain full model exported by optimum (the reference a user
                                  would otherwise deploy), unless `no_baseline`; quantized like the
                                  package, when it is;
  baseline-full/                  a quantized package's plain model with float weights (optimum fp32).
It is built in a temporary directory and swapped in only when complete and verified.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dyninfer.compressors.stop_rule import REASONING
from dyninfer.core.artifact_files import MANIFEST_NAME, give_usual_modes, staged_directory
from dyninfer.core.choices import EXPORT_KV_LAYOUTS
from dyninfer.core.errors import DyninferError, option
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import LogitLens
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.core.records import StopRecord
from dyninfer.exporters import attention, ops
from dyninfer.exporters.certificate import PackageCertificate, carried_over, graph_hashes
from dyninfer.exporters.graph_tidy import fold_weight_transposes, strip_node_metadata
from dyninfer.exporters.onnx_runtime import (
    NEXT_TOKEN_OUTPUT,
    PACKAGE_FORMAT,
    PACKAGE_MANIFEST,
    PACKAGE_VERSION,
    POSITIONS_INPUT,
    PROVIDERS,
    STOP_OUTPUT,
    OnnxDynamicModel,
    create_session,
)
from dyninfer.exporters.quantize import DEFAULT_ACCURACY_LEVEL, quantize_weights
from dyninfer.exporters.step import DynamicStep, buffered_step_problem, check_exportable, step_attention
from dyninfer.runtime.dynamic import DynamicModel
from dyninfer.runtime.loader import LoadedDynamic, probe_vocabulary, stored_stop_policy

MODEL_FILE = "model.onnx"
BASELINE_DIR = "baseline"
BASELINE_FULL_DIR = "baseline-full"  # a quantized package's plain model with float weights (bench's fp32 row)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
EXITS_DISABLED = 2.0  # an exit threshold no confidence (<= 1) reaches


@dataclass
class ExportResult:
    path: str
    provider: str
    dtype: str
    num_layers: int
    exit_points: list[int]
    threshold: float | None
    kv_mode: str | None
    custom_nodes: dict[str, int]  # op type -> count in the saved graph
    model_bytes: int
    verify_max_abs_diff: float | None  # logits, ONNX vs torch, one prefill + decode step (before quantizing)
    baseline: str | None
    seconds: float
    notes: list[str] = field(default_factory=list)
    weights: dict | None = None  # the weight-only quantization ({format, block_size, ...}); None: full weights
    quantized_max_abs_diff: float | None = None  # logits, the quantized package vs torch (information, not a check)
    certificate: dict | None = None  # PackageCertificate.to_dict(): the bound the manifest carries, and what it is about
    kv_layout: str = "concat"  # "buffer": preallocated KV buffers updated in place (exporters/attention.py)

    def to_dict(self) -> dict:
        return asdict(self)


def input_names(num_layers: int, kv_layout: str = "concat") -> list[str]:
    positions = [POSITIONS_INPUT] if kv_layout == "buffer" else []
    return ["input_ids", "exit_threshold", *positions] + [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def output_names(num_layers: int) -> list[str]:
    return ["logits", "exit_layer", "exit_confidence", STOP_OUTPUT, NEXT_TOKEN_OUTPUT] + [
        f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")
    ]


def check_options(provider: str, dtype: str) -> None:
    if provider not in PROVIDERS:
        raise DyninferError(f"`provider` must be one of {', '.join(PROVIDERS)}, got '{provider}'")
    if dtype not in DTYPES:
        raise DyninferError(f"`dtype` must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if dtype == "fp16" and provider == "cpu":
        raise DyninferError(
            "fp16 packages are for the CUDA execution provider (ONNX Runtime's CPU kernels are fp32); use `provider` cuda or `dtype` fp32"
        )


def provider_problem(provider: str) -> str | None:
    """Why ONNX Runtime cannot run `provider` here (None when it can), found on a one-node model."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    probe.ir_version = 9
    return create_session(probe.SerializeToString(), provider)[1]


def check_package_dir(out: Path) -> None:
    """Refuse an output path that is not a new, empty or package directory, before any work."""
    parent = out.resolve().parent
    if out.exists() and not out.is_dir():
        raise DyninferError(f"`out` '{out}' is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / PACKAGE_MANIFEST).is_file():
        raise DyninferError(f"`out` '{out}' is a non-empty directory that is not a dyninfer ONNX package; choose a new or empty directory")
    if not parent.is_dir():
        raise DyninferError(f"the parent directory of `out` '{out}' does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DyninferError(f"cannot write into '{parent}' (permission denied); choose another `out`")


@contextlib.contextmanager
def _quiet_exporters():
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
    dynamic: DynamicModel, path: Path, geometry: list[tuple[int, int]], dtype: str = "fp32", kv_layout: str = "concat"
) -> None:
    """Trace the dynamic model's decoding step and save it (weights as external data) at `path`; `geometry`:
    its `kv_geometry`."""
    import onnx
    from torch.export import Dim

    lm, lens = dynamic.lm, dynamic.lens
    torch_dtype = DTYPES[dtype]
    if torch_dtype != torch.float32:  # trace a converted copy; the loaded model stays fp32
        lm = LayeredModel(copy.deepcopy(lm.model).to(torch_dtype))
        lens = copy.deepcopy(lens).to(torch_dtype) if isinstance(lens, torch.nn.Module) else LogitLens(lm)
        dynamic = DynamicModel(lm, dynamic.policy, lens, dynamic.classifier)
    step = DynamicStep(dynamic, kv_layout).eval()
    batch, new = Dim("batch", min=1, max=256), Dim("sequence", min=1, max=65536)
    inputs, past = _example_inputs(lm, geometry, 2, 3, 4, torch_dtype, kv_layout)
    if kv_layout == "buffer":
        capacity = Dim("capacity", min=1, max=65536)
        shapes = ({0: batch, 1: new}, None, ({0: Dim("total", min=1, max=65536)}, *({0: batch, 2: capacity} for _ in past)))
    else:
        shapes = ({0: batch, 1: new}, None, tuple({0: batch, 2: Dim("past", min=0, max=65536)} for _ in past))
    config = lm.model.config
    try:
        with torch.no_grad(), _quiet_exporters(), step_attention(lm, kv_layout):
            program = torch.onnx.export(
                step,
                (*inputs, *past),
                dynamic_shapes=shapes,
                input_names=input_names(lm.num_layers, kv_layout),
                output_names=output_names(lm.num_layers),
                custom_translation_table=ops.translation_table() | attention.translation_table(),
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
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024
    )


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


def write_package(
    directory: Path,
    dynamic: DynamicModel,
    *,
    provider: str = "cpu",
    dtype: str = "fp32",
    eos_token_id: int | None = None,
    base_model: dict | None = None,
    kv_layout: str = "auto",
) -> dict:
    """Export the step into `directory` and write the package manifest; returns the manifest (its `notes`: what
    the export could not do as asked)."""
    import onnx

    check_options(provider, dtype)
    check_exportable(dynamic.lm, dynamic.policy)
    lm = dynamic.lm
    geometry = kv_geometry(lm)  # a forward pass through every layer: once per package
    kv_layout, layout_note = choose_kv_layout(dynamic, geometry, provider, dtype, kv_layout)
    export_step_onnx(dynamic, directory / MODEL_FILE, geometry, dtype, kv_layout)
    counts: dict[str, int] = {}
    for node in ops.custom_nodes(onnx.load(str(directory / MODEL_FILE), load_external_data=False)):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    policy = dynamic.policy.to_dict() if dynamic.policy is not None else {"threshold": None, "exit_points": []}
    manifest = {
        "format": PACKAGE_FORMAT,
        "version": PACKAGE_VERSION,
        "model_file": MODEL_FILE,
        "provider": provider,
        "dtype": dtype,
        "family": lm.family,
        "num_layers": lm.num_layers,
        "vocab_size": lm.vocab_size,
        "kv_geometry": geometry,
        "policy": policy,
        "eos_token_id": eos_token_id,
        "base_model": base_model,
        "kv_layout": kv_layout,
        "inputs": input_names(lm.num_layers, kv_layout),
        "outputs": output_names(lm.num_layers),
        "exits_disabled_threshold": EXITS_DISABLED,
        "custom_ops": {"domain": ops.DOMAIN, "nodes": counts},
        "notes": [layout_note] if layout_note else [],
    }
    _write_manifest(directory, manifest)
    return manifest


def _write_manifest(directory: Path, manifest: dict) -> None:
    """(Re)write the manifest with the size of every file now in the package."""
    manifest["files"] = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != PACKAGE_MANIFEST}
    (directory / PACKAGE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def export_baseline(dyn: LoadedDynamic, target: Path) -> None:
    """The plain model through optimum's exporter (what a user would deploy without dyninfer)."""
    from optimum.exporters.onnx import onnx_export_from_model

    try:
        with _quiet_exporters():
            onnx_export_from_model(dyn.loaded.model, target, task="text-generation-with-past", do_validation=False)
    except Exception as exc:
        raise DyninferError(
            f"optimum could not export the baseline: {' '.join(str(exc).split())[:300]} (pass `no_baseline` to skip it)"
        ) from exc
    dyn.loaded.tokenizer.save_pretrained(target)


def preflight(target: Path | None, provider: str, dtype: str, verify: bool) -> None:
    """Everything an export can refuse before the model loads: options, the output path (unless None: a
    caller that builds the package inside a staged folder), the provider."""
    check_options(provider, dtype)
    if target is not None:
        check_package_dir(target)
    problem = provider_problem(provider) if verify else None
    if problem:
        raise DyninferError(f"{problem}; export with `provider` cpu, or with `no_verify` to build the package for another machine")


def export_dynamic(
    dyn: LoadedDynamic,
    target: Path,
    *,
    provider: str = "cpu",
    dtype: str = "fp32",
    baseline: bool = True,
    verify: bool = True,
    weights: str = "full",
    block_size: int = 32,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    source_manifest: Path | None = None,
    lock: bool = True,
    certify: Callable[[Path], PackageCertificate] | None = None,
    kv_layout: str = "auto",
    progress: ProgressFn | None = None,
) -> ExportResult:
    """Export `dyn` as a package at `target`, built aside and swapped in only when complete and verified.

    Call `preflight` first (before loading anything). The package keeps a copy of the artifact's
    manifest: `source_manifest`, else the one of the saved artifact `dyn` was built from. `lock=False`:
    `target` is inside a staged copy of the artifact that no other process sees (`audit`). `certify(package)`:
    certifies the staged package (after quantizing, before the baseline); its threshold becomes the package's.
    Without it the manifest carries calibration's bound, marked as computed on the torch model.
    """
    report = progress or silent
    if dyn.policy is None:
        raise DyninferError("the artifact has no early-exit policy; run `dyninfer calibrate` into it first")
    if source_manifest is None:
        if dyn.artifact.path is None:
            raise ValueError("export_dynamic needs a saved artifact, or its manifest as `source_manifest`")
        source_manifest = Path(dyn.artifact.path) / MANIFEST_NAME
    started = time.perf_counter()
    steps = (4 if baseline else 3) + (weights != "full") + (certify is not None)
    lm = dyn.loaded.layered
    notes = []
    if dyn.policy.threshold is None:
        notes.append("the policy certified no threshold: the package never exits (it is the full model)")
    with staged_directory(target, lock=lock) as tmp:
        report("exporting the dynamic step", 1, steps)
        tokenizer = dyn.loaded.tokenizer
        manifest = write_package(
            tmp,
            dyn.dynamic,
            provider=provider,
            dtype=dtype,
            eos_token_id=tokenizer.eos_token_id,
            base_model={"spec": dyn.loaded.spec, "content_hash": dyn.loaded.content_hash},
            kv_layout=kv_layout,
        )
        notes += manifest["notes"]
        tokenizer.save_pretrained(tmp)
        dyn.loaded.model.config.save_pretrained(tmp)
        shutil.copyfile(source_manifest, tmp / "source-artifact.json")
        manifest["baseline"] = BASELINE_DIR if baseline else None
        manifest["stop"], stop_notes = package_stop_rules(dyn)
        notes += stop_notes
        _write_manifest(tmp, manifest)
        difference = None
        if verify:
            report("verifying against torch", 2, steps)
            difference = verify_package(dyn.dynamic, tmp, provider)
            if difference > (1e-2 if dtype == "fp32" else 0.5):
                raise DyninferError(
                    f"the exported graph's logits differ from torch by {difference:.3g}; the export is wrong, nothing was written"
                )
        quantized = quantized_difference = None
        if weights != "full":
            report(f"quantizing the weights to {weights}", 3, steps)
            quantized = manifest["weights"] = quantize_weights(tmp / MODEL_FILE, weights, block_size, accuracy_level)
            _write_manifest(tmp, manifest)
            if verify:  # how far quantizing moved the logits: reported, since any quantization moves them
                quantized_difference = verify_package(dyn.dynamic, tmp, provider)
        if certify is not None:
            report("certifying the package", steps - 1 - baseline, steps)
            certificate = certify(tmp)
            certificate.graph_sha256 = graph_hashes(tmp, sorted(p.name for p in tmp.iterdir() if p.name.startswith(MODEL_FILE)))
            manifest["policy"]["threshold"] = certificate.threshold  # the threshold certified on this graph
        else:
            certificate = _carried_over_bound(dyn, dtype, weights)
        manifest["certificate"] = certificate.to_dict() if certificate is not None else None
        _write_manifest(tmp, manifest)
        if baseline:
            report("exporting the optimum baseline", steps - 1, steps)
            export_baseline(dyn, tmp / BASELINE_DIR)
            if weights != "full":  # the same quantizer, so the baseline is the plain model at the same precision
                shutil.copytree(tmp / BASELINE_DIR, tmp / BASELINE_FULL_DIR)
                manifest["baseline_full"] = BASELINE_FULL_DIR
                manifest["baseline_weights"] = quantize_weights(tmp / BASELINE_DIR / "model.onnx", weights, block_size, accuracy_level)
                _write_manifest(tmp, manifest)
        give_usual_modes(tmp)  # model.onnx.data and safetensors files are written 0600
        model_bytes = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith(MODEL_FILE))
        counts = manifest["custom_ops"]["nodes"]
    report("done", steps, steps)
    policy = dyn.policy
    if certificate is not None and not certificate.on_package:
        notes.append(
            f"the bound is calibration's: {certificate.statement()}; export with {option('certify')} to certify the package itself"
        )
    return ExportResult(
        str(target),
        provider,
        dtype,
        lm.num_layers,
        list(policy.exit_points),
        manifest["policy"]["threshold"],  # the certified package's own, or the policy's
        policy.kv_mode,
        counts,
        model_bytes,
        difference,
        str(target / BASELINE_DIR) if baseline else None,
        time.perf_counter() - started,
        notes,
        quantized,
        quantized_difference,
        certificate.to_dict() if certificate is not None else None,
        manifest["kv_layout"],
    )


def _carried_over_bound(dyn: LoadedDynamic, dtype: str, weights: str) -> PackageCertificate | None:
    """Calibration's bound, as what the package carries when it was not certified itself."""
    placement = dyn.calibration.get("placement") or {}
    model = f"the torch dynamic model ({placement.get('dtype', 'float32')})"
    return carried_over(dyn.calibration, dyn.loaded.base_model_info(), model, weights if weights != "full" else dtype)


def package_stop_rules(dyn: LoadedDynamic) -> tuple[dict, list[str]]:
    """The artifact's stop rules certified on this model, as the package's runtime obeys them (a reasoning rule
    with its probe vocabulary: the runtime has no tokenizer); a note for each rule left out."""
    record = StopRecord.read(dyn.artifact)
    rules, notes = {}, []
    for workload in record.rules if record is not None else {}:
        try:
            policy = stored_stop_policy(dyn, workload)
            rules[workload] = {"policy": policy.to_dict()}
            if workload == REASONING:
                rules[workload]["vocabulary"] = probe_vocabulary(dyn.loaded.tokenizer, policy.probe_suffix).to_dict()
        except DyninferError as exc:
            rules.pop(workload, None)
            notes.append(f"the {workload} stop rule is not in the package: {exc}")
    return rules, notes


def verify_package(dynamic: DynamicModel, package: Path, provider: str) -> float:
    """Max |logit difference| between the package and the torch dynamic model: prefill, then one decode step."""
    runtime = OnnxDynamicModel(package, provider=provider)
    prompt = torch.arange(1, 6)[None] % dynamic.lm.vocab_size
    reference = dynamic.generate(prompt, 2, mode="early-exit", return_logits=True)
    ours = runtime.generate(prompt.numpy(), 2, mode="early-exit", return_logits=True)
    return max(float((torch.from_numpy(a).float() - b.float()).abs().max()) for a, b in zip(ours.logits, reference.logits))
