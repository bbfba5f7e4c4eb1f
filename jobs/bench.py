"""`bench`: an artifact's dynamic model against the full model, side by side in one run, with CI gates.

torch backend: transformers' greedy decoding (the baseline) against early exit, lossless
self-speculation and the dynamic code path with exits disabled. onnx backend: optimum's
ORTModelForCausalLM (the baseline) against the exported package with and without exits, and
the torch dynamic model. Prompts are the start of held-out windows of the calibration's data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dyninfer.core.choices import DEFAULT_DATA
from dyninfer.core.data import load_windows
from dyninfer.core.errors import DyninferError, option
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.core.provenance import provenance
from dyninfer.core.records import CalibrateRecord
from dyninfer.jobs.configs import PACKAGE_DIR, BenchConfig
from dyninfer.jobs.run import draft_settings, plan_note
from dyninfer.jobs.stop import heldout_requests
from dyninfer.profilers.bench import BenchResult, run_bench
from dyninfer.profilers.genai_row import GENAI_INT4, MISSING_NOTE, build_genai, genai_folder, genai_row, local_genai_python
from dyninfer.profilers.onnx_bench import run_onnx_bench
from dyninfer.profilers.stop_bench import StopBenchResult, run_stop_bench
from dyninfer.runtime.loader import load_dynamic, stored_stop_policy
from dyninfer.runtime.onnx_decoder import OnnxDecoder
from dyninfer.runtime.package_format import PackageCertificate, read_package


@dataclass
class BenchReport:
    config: BenchConfig
    data: str
    result: BenchResult | StopBenchResult
    gates_failed: list[str] = field(default_factory=list)
    placement: dict | None = None  # where the torch model ran ({device, dtype})
    provenance: dict = field(default_factory=provenance)  # the commit, versions and command line it ran with

    @property
    def passed(self) -> bool:
        return not self.gates_failed

    def summary(self) -> dict:
        return {
            "command": "bench",
            "data": self.data,
            **self.result.to_dict(),
            "gates_failed": self.gates_failed,
            "placement": self.placement,
            "provenance": self.provenance,
        }


def gate_failures(config: BenchConfig, result: BenchResult) -> list[str]:
    """One line per failed gate, naming the gate by its config field."""
    gated, failures = result.gated, []
    if config.min_speedup is not None and not gated.speedup >= config.min_speedup:
        against = f" (against {result.speedup_reference})" if result.speedup_reference else ""
        failures.append(f"speedup {gated.speedup:.3f}x{against} < `min_speedup` {config.min_speedup}")
    measure = (result.certified or {}).get("measure", "tokens")
    value = gated.consistency_by(measure)
    if config.min_consistency is not None and not value >= config.min_consistency:
        failures.append(f"{measure} consistency {value:.3f} < `min_consistency` {config.min_consistency}")
    return failures


def bench_prompts(config: BenchConfig, dyn) -> tuple[str, torch.Tensor, int]:
    """(data spec, prompts [n, prompt tokens], new tokens): held-out prompts drawn like the calibration's.

    On the calibration's data the prompts are the starts of held-out windows of its own split (its
    window length and seed), in its random held-out order: never text the calibration saw. The
    prompt length and continuation length default to the calibration's, the setting its
    generation guarantee is for.
    """
    record = dyn.calibration
    certificate = record.certificate if record is not None else None
    corpus = record.corpus if record is not None else None
    generation = certificate is not None and certificate.on_prompts
    prompt_tokens = config.prompt_tokens or (certificate.prompt_tokens if generation else None) or 64
    new_tokens = config.new_tokens or (certificate.new_tokens if generation else None) or 64
    spec = config.data or (corpus.spec if corpus else None) or DEFAULT_DATA
    same_split = (
        corpus is not None
        and spec == corpus.spec
        and config.field == corpus.field
        and config.seed == corpus.seed
        and corpus.seq_len >= prompt_tokens
    )
    seq_len = corpus.seq_len if same_split else prompt_tokens
    windows = load_windows(spec, dyn.loaded.tokenizer, field=config.field, seq_len=seq_len, seed=config.seed)
    rows = windows.take_rows("heldout", config.prompts * seq_len, option="prompts")
    return spec, windows.heldout[rows][:, :prompt_tokens], new_tokens


def run(config: BenchConfig, artifact: str | os.PathLike, progress: ProgressFn | None = None) -> BenchReport:
    """Benchmark the artifact at `artifact` (batch 1, greedy) and judge the gates."""
    config.validate()
    package = Path(config.package) if config.package else Path(artifact) / PACKAGE_DIR
    if config.backend == "onnx":  # before the model loads
        if not package.exists():
            raise DyninferError(f"no ONNX package at '{package}'; run `dyninfer export` on the artifact first, or pass {option('package')}")
        read_package(package)
    dyn = load_dynamic(
        str(artifact),
        config.model,
        require_policy=config.stop is None,
        kv_mode=config.kv_mode,
        full_depth_is_enough=config.backend == "torch",
        placement=config.placement(),
    )
    if config.stop is not None:
        return _run_stop(config, dyn, progress)
    spec, prompt_ids, new_tokens = bench_prompts(config, dyn)
    if config.backend == "onnx":
        runtime = OnnxDecoder(package, provider=config.provider)
        result = _onnx_bench(config, dyn, runtime, prompt_ids, new_tokens, progress)
    else:
        layer, max_draft, plan = draft_settings(dyn, prompt_ids[:1], config.draft_layer)
        result = run_bench(
            dyn, prompt_ids, new_tokens, draft_layer=layer, max_draft=max_draft, draft_threshold=config.draft_threshold, progress=progress
        )
        if plan is not None:
            result.speculation_plan = plan.to_dict()
            result.notes.append(plan_note(plan))
    if config.backend == "onnx":  # what the package ships with: its own certificate, or calibration's marked as such
        result.certified = package_certified_here(runtime.certificate, result)
    else:
        result.certified = certified_here(dyn.calibration, result)
    result.notes += dyn.notes
    return BenchReport(config, spec, result, gate_failures(config, result), dyn.loaded.placement)


def _onnx_bench(config: BenchConfig, dyn, runtime: OnnxDecoder, prompt_ids, new_tokens: int, progress) -> BenchResult:
    """The package's bench, with onnxruntime-genai's int4 export of the same model as a row where a Python with
    onnxruntime-genai is at hand (built once into the user cache), else a note saying how to add it."""
    python = config.genai_python or local_genai_python()
    if python is None:
        result = run_onnx_bench(dyn, runtime, prompt_ids, new_tokens, memory=config.memory, progress=progress)
        result.notes.append(MISSING_NOTE)
        return result
    report = progress or silent
    report("building onnxruntime-genai's int4 export", 0, 1)
    folder = genai_folder(dyn.loaded.content_hash, "int4")
    build = build_genai(python, dyn.loaded.pretrained_path, folder, "int4")
    report("building onnxruntime-genai's int4 export", 1, 1)
    row, worker = genai_row(python, folder, GENAI_INT4, new_tokens, runtime.num_layers)
    try:
        result = run_onnx_bench(dyn, runtime, prompt_ids, new_tokens, memory=config.memory, extra_rows=[row], progress=progress)
    finally:
        worker.close()
    result.notes.append(f"{GENAI_INT4}: `{' '.join(build['command'][1:])}` with {build['versions']}")
    return result


def _run_stop(config: BenchConfig, dyn, progress: ProgressFn | None) -> BenchReport:
    """The stop rule side by side with plain generation, on the stop job's held-out units."""
    policy = stored_stop_policy(dyn, config.stop)
    draw, requests = heldout_requests(dyn, config.stop, config.prompts)
    if config.new_tokens is not None and config.new_tokens != policy.new_tokens:
        raise DyninferError(
            f"the {config.stop} stop rule was certified for {policy.new_tokens} new tokens; leave {option('new_tokens')} out "
            "(bench measures the setting it was certified for)"
        )
    result = run_stop_bench(dyn, policy, requests, policy.new_tokens, progress)
    result.notes += [policy.statement] + dyn.notes
    failures = []
    gated = result.runner(result.gated)
    if config.min_speedup is not None and not gated.request_speedup >= config.min_speedup:
        failures.append(f"time per request {gated.request_speedup:.3f}x faster < `min_speedup` {config.min_speedup}")
    return BenchReport(config, draw.data, result, failures, dyn.loaded.placement)


def certified_here(record: CalibrateRecord | None, result: BenchResult) -> dict | None:
    """The calibration's certified bound beside what the gated mode achieved here, in the same measure."""
    certificate = None if record is None else record.certificate
    if certificate is None:
        return None
    return {
        "risk": certificate.risk,
        "measure": certificate.measure,
        "bound": certificate.target,
        "epsilon": certificate.epsilon,
        "measured": result.gated.consistency_by(certificate.measure),
        "mode": result.gated.mode,
    }


def package_certified_here(certificate: PackageCertificate | None, result: BenchResult) -> dict | None:
    """The package's certificate beside what its exits achieved here against the original model, in its measure."""
    if certificate is None:
        return None
    return {
        "risk": certificate.risk,
        "measure": certificate.measure,
        "bound": certificate.target,
        "epsilon": certificate.epsilon,
        "measured": result.gated.consistency_by(certificate.measure),
        "mode": result.gated.mode,
        "computed_on": certificate.computed_on,
        "statement": certificate.statement(),
    }
