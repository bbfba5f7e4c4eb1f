"""Every command's options as a Config dataclass: the defaults, and the checks made before any work.

Importable without torch (only `core.choices`, `core.errors`, `core.placement`, the artifact's file
rules and the tuning settings), so the CLI builds each command's `--help` from these without
loading a model library. The job modules (`jobs/probe.py`, ...) re-export their Config, and the
audit composes the stage Configs (`AuditConfig.probe_config()`, ...).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from dyninfer.compressors.tuning_settings import TuningSettings
from dyninfer.core.artifact_files import artifact_exists, check_output_dir
from dyninfer.core.choices import (
    BUILTIN_CODE,
    BUILTIN_COT,
    COMPLETION,
    CONSISTENCY_MEASURES,
    COST_SOURCES,
    DEFAULT_DATA,
    DEFAULT_MODEL,
    EXPORT_DTYPES,
    EXPORT_KV_LAYOUTS,
    EXPORT_WEIGHTS,
    GENERATION_RISK,
    KV_MODES,
    LENS_KINDS,
    LOGIT,
    MEASURES,
    ONNX_PROVIDERS,
    PRUNE_ALLOCATIONS,
    PRUNE_BACKENDS,
    PRUNE_LABELS,
    PRUNE_METHODS,
    REASONING,
    RISKS,
    RUN_BACKENDS,
    RUN_MODES,
    STEER_KINDS,
    STEER_METHODS,
    STOP_CONDITIONS,
    STOP_MODES,
    STOP_PROBE_SITES,
    STOP_SIGNALS,
    STOP_VALUE_UNITS,
    STOP_WORKLOADS,
    TUNED,
)
from dyninfer.core.errors import DyninferError, check_at_least, check_between, check_choice, check_positive, check_seed, option
from dyninfer.core.placement import PlacementOptions
from dyninfer.core.records import StopDraw
from dyninfer.exporters.quantize import DEFAULT_ACCURACY_LEVEL, check_accuracy_level, check_block_size


def _check_seed(config) -> None:
    if hasattr(config, "seed"):
        check_seed(config.seed)


PACKAGE_DIR = "onnx"  # an export's package, inside the artifact unless `out` says otherwise
# α values a steering check sweeps by default: around where each method starts to act (docs/steer.md).
STEER_ALPHAS = {"activation": (0.25, 0.5, 1.0), "valve": (0.1, 0.2, 0.5)}


@dataclass
class ProbeConfig(PlacementOptions):
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    field: str | None = None
    lenses: tuple[str, ...] = (LOGIT,)
    tokens: int = 2048  # held-out next-token predictions to probe
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 2
    lens_train_tokens: int = 16384
    lens_steps: int = 60
    lens_from: str | None = None  # an artifact whose tuned lens to reuse instead of training
    retrain_lens: bool = False  # train a new tuned lens even if the artifact has one
    memory_budget_mib: int = 256  # full-vocabulary tensors of one token chunk (see run_probe)

    def validate(self) -> None:
        self.placement().validate()
        _check_seed(self)
        unknown = [k for k in self.lenses if k not in LENS_KINDS]
        if unknown or not self.lenses:
            raise DyninferError(f"unknown lens {', '.join(unknown) or '(none)'}; choose from: {', '.join(LENS_KINDS)}")
        for name, low in (
            ("tokens", 1),
            ("seq_len", 2),
            ("batch_size", 1),
            ("lens_train_tokens", 1),
            ("lens_steps", 0),
            ("memory_budget_mib", 1),
        ):
            check_at_least(name, getattr(self, name), low)
        if self.lens_from and TUNED not in self.lenses:
            raise DyninferError(f"{option('lens_from')} only makes sense with {option('lenses')} tuned")


@dataclass
class ProfileConfig(PlacementOptions):
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA  # where the prompt comes from (pruned models' masks depend on the text)
    field: str | None = None
    context: int = 256  # prompt length of the prefill; cached tokens before the decode step
    warmup: int = 3
    repeats: int = 20
    energy_seconds: float = 3.0  # per energy window on a GPU
    seed: int = 0

    def validate(self) -> None:
        self.placement().validate()
        _check_seed(self)
        for name, low in (("context", 1), ("warmup", 0), ("repeats", 3)):
            check_at_least(name, getattr(self, name), low)
        check_positive("energy_seconds", self.energy_seconds)


@dataclass
class CalibrateConfig(PlacementOptions):
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    field: str | None = None
    seq_len: int = 256
    seed: int = 0
    lens: str = TUNED
    # CALM's learned classifier reads the hidden state: a check costs ~2d FLOPs instead of the
    # LM head, which on small models costs more than the layers an exit can save.
    measure: str = "classifier"
    target: float = 0.95
    epsilon: float = 0.05
    # generation: certify the dynamic model's own continuations; the teacher-forced risks simulate exits.
    risk: str = GENERATION_RISK
    # generation risk: prompts (one per random train window), their length and the continuation length
    prompts: int = 128
    heldout_prompts: int = 32
    prompt_tokens: int = 64
    new_tokens: int = 32
    consistency: str = "tokens"
    batch_size: int = 32  # prompts generated together (each still exits as it would alone)
    fit_tokens: int = 4096  # half fits the classifier, half chooses the exit points and the candidate grid
    calibration_tokens: int = 32768  # teacher-forced risks: whole windows, LTT's examples
    heldout_tokens: int = 4096
    vocab_top_k: int = 0
    min_layer: int | None = None
    max_points: int = 8
    kv_mode: str = "propagate"
    lens_from: str | None = None
    lens_train_tokens: int = 16384
    lens_steps: int = 60
    cost: str = "auto"
    # More targets to calibrate on the same traces (reported; the artifact keeps `target`'s policy).
    extra_targets: tuple[float, ...] = ()
    # generation risk: continue each candidate's runs from the previous candidate's (the same certified result for
    # less work, early_exit/generation.py's CandidateRuns); False generates every candidate anew (benchmarks compare)
    reuse_runs: bool = True

    def validate(self) -> None:
        self.placement().validate()
        _check_seed(self)
        for name, allowed in (
            ("lens", LENS_KINDS),
            ("measure", MEASURES),
            ("risk", RISKS),
            ("kv_mode", KV_MODES),
            ("cost", COST_SOURCES),
            ("consistency", CONSISTENCY_MEASURES),
        ):
            check_choice(name, getattr(self, name), allowed)
        for name, value in (("target", self.target), ("epsilon", self.epsilon), *(("extra_targets", t) for t in self.extra_targets)):
            check_between(name, value, 0.0, 1.0)
        for name, low in (
            ("fit_tokens", 1),
            ("calibration_tokens", 1),
            ("heldout_tokens", 1),
            ("prompts", 1),
            ("heldout_prompts", 1),
            ("prompt_tokens", 1),
            ("new_tokens", 1),
            ("batch_size", 1),
            ("vocab_top_k", 0),
            ("max_points", 1),
            ("seq_len", 2),
        ):
            check_at_least(name, getattr(self, name), low)
        if self.risk == GENERATION_RISK and self.prompt_tokens > self.seq_len:
            raise DyninferError(
                f"{option('prompt_tokens')} {self.prompt_tokens} is longer than the windows prompts "
                f"are cut from ({option('seq_len')} {self.seq_len}); lower it or raise "
                f"{option('seq_len')}"
            )


@dataclass
class PruneConfig(PlacementOptions):
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    field: str | None = None
    seq_len: int = 256
    seed: int = 0
    method: str = "threshold"
    sparsity: float = 0.5
    sweep: tuple[float, ...] = ()  # more sparsities to evaluate (reported; the artifact keeps `sparsity`)
    allocation: str = "uniform"
    input_sparsity: float = 0.0
    rank: int = 64
    label: str = "topk"
    mass: float = 0.9
    steps: int = 300
    calibration_tokens: int = 4096
    heldout_tokens: int = 4096
    speed: bool = True
    prompts: int = 4
    prompt_tokens: int = 64
    new_tokens: int = 32
    backend: str = "auto"

    def validate(self) -> None:
        self.placement().validate()
        _check_seed(self)
        for name, allowed in (
            ("method", PRUNE_METHODS),
            ("allocation", PRUNE_ALLOCATIONS),
            ("label", PRUNE_LABELS),
            ("backend", PRUNE_BACKENDS),
        ):
            check_choice(name, getattr(self, name), allowed)
        for name, value in (("sparsity", self.sparsity), *(("sweep", s) for s in self.sweep)):
            check_between(name, value, 0.0, 1.0)
        check_between("input_sparsity", self.input_sparsity, 0.0, 1.0, low_open=False)
        if self.input_sparsity and self.method != "threshold":
            raise DyninferError(f"{option('input_sparsity')} applies to {option('method')} threshold only")
        if self.label == "mass":
            check_between("mass", self.mass, 0.0, 1.0)
        for name, low in (
            ("rank", 1),
            ("steps", 1),
            ("calibration_tokens", 1),
            ("heldout_tokens", 1),
            ("prompts", 1),
            ("prompt_tokens", 1),
            ("new_tokens", 1),
            ("seq_len", 2),
        ):
            check_at_least(name, getattr(self, name), low)

    def sparsities(self) -> list[float]:
        return sorted({round(s, 6) for s in [self.sparsity, *self.sweep]})


@dataclass
class TuneConfig(PlacementOptions, TuningSettings):
    """The training settings (`TuningSettings`), where the model runs, and the data and measurement."""

    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    field: str | None = None
    seq_len: int = 256
    heldout_tokens: int = 1024
    draft_vocab: int = 4096  # the speculative draft head's prior candidates (most frequent train tokens); 0: none
    merge_out: str | None = None

    def settings(self) -> TuningSettings:
        names = [f.name for f in dataclasses.fields(TuningSettings)]
        return TuningSettings(**{name: getattr(self, name) for name in names})

    def validate(self) -> None:
        self.placement().validate()
        _check_seed(self)
        self.settings().validate()
        check_at_least("heldout_tokens", self.heldout_tokens, 1)
        check_at_least("draft_vocab", self.draft_vocab, 0)
        check_at_least("seq_len", self.seq_len, 2)
        if self.merge_out is not None:
            check_output_dir(self.merge_out)
            if artifact_exists(self.merge_out):
                raise DyninferError(
                    f"{option('merge_out')} '{self.merge_out}' is a dyninfer artifact; give the merged checkpoint its own directory"
                )

    def check_outputs(self, out) -> None:
        """The merged checkpoint and the artifact must not share a folder (either would replace the other), checked
        before the training."""
        if self.merge_out is None or out is None:
            return
        merged, artifact = os.path.realpath(self.merge_out), os.path.realpath(out)
        if os.path.commonpath([merged, artifact]) in (merged, artifact):
            raise DyninferError(
                f"{option('merge_out')} '{self.merge_out}' and the artifact '{out}' overlap; give the merged checkpoint a "
                "directory of its own, outside the artifact"
            )


@dataclass
class ExtractConfig(PlacementOptions):
    model: str = DEFAULT_MODEL
    method: str = "activation"
    data: str = BUILTIN_COT
    examples: int = 128  # training examples (the first `shots` of them become the prompt's worked examples)
    heldout: int = 32
    seed: int = 0
    shots: int = 0
    layers: tuple[int, ...] | None = None
    kind: str = "mean"
    rank: int = 8
    steps: int = 150
    lr: float = 2e-3
    batch_size: int = 4
    targets: tuple[str, ...] | None = None
    delta_from: str | None = None
    delta_to: str | None = None

    def validate(self) -> None:
        self.placement().validate()
        _check_seed(self)
        check_choice("method", self.method, STEER_METHODS)
        check_choice("kind", self.kind, STEER_KINDS)
        for name, low in (("examples", 2), ("heldout", 1), ("rank", 1), ("steps", 1), ("batch_size", 1), ("shots", 0)):
            check_at_least(name, getattr(self, name), low)
        if self.shots >= self.examples:
            raise DyninferError(f"{option('shots')} ({self.shots}) must be smaller than {option('examples')} ({self.examples})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise DyninferError(f"{option('lr')} must be a positive number, got {self.lr}")
        if (self.delta_from is None) != (self.delta_to is None):
            raise DyninferError(f"{option('delta_from')} and {option('delta_to')} go together (either may be `base`)")
        if self.delta_from is not None and self.method != "valve":
            raise DyninferError(f"{option('delta_from')}/{option('delta_to')} make a CoT-Valve direction: use {option('method')} valve")

    def split_record(self) -> dict:
        return {"data": self.data, "seed": self.seed, "examples": self.examples, "heldout": self.heldout, "shots": self.shots}


@dataclass
class SweepConfig(PlacementOptions):
    method: str | None = None  # None: the only method the artifact holds
    alphas: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)  # 0 is always swept
    questions: int | None = None  # None: the extraction's held-out count
    max_new_tokens: int = 128
    batch_size: int = 16
    keep: float = 0.9  # share of the unsteered answers a setting must keep to count as best
    model: str | None = None  # None: the artifact's base model spec

    def validate(self) -> None:
        self.placement().validate()
        _check_seed(self)
        if self.method is not None:
            check_choice("method", self.method, STEER_METHODS)
        check_at_least("max_new_tokens", self.max_new_tokens, 1)
        check_at_least("batch_size", self.batch_size, 1)
        check_between("keep", self.keep, 0.0, 1.0, high_open=False)
        if any(not math.isfinite(a) for a in self.alphas):
            raise DyninferError(f"{option('alphas')} must be finite numbers")
        if self.questions is not None:
            check_at_least("questions", self.questions, 1)


@dataclass
class ApplyConfig:
    alpha: float = 0.0  # 0 is the base model, positive shortens
    method: str | None = None  # None: the only method the artifact holds

    def validate(self) -> None:
        if not math.isfinite(self.alpha):
            raise DyninferError(f"{option('alpha')} must be a finite number, got {self.alpha}")
        if self.method is not None:
            check_choice("method", self.method, STEER_METHODS)


@dataclass
class ExportConfig:
    out: str | None = None  # the package directory; None: ARTIFACT/onnx
    provider: str = "cpu"  # the execution provider the package is for: cuda or cpu
    dtype: str = "fp32"  # fp16 is for the CUDA provider
    model: str | None = None  # load the base model from here instead (same weights)
    kv_mode: str | None = None  # override the policy's KV mode (the graph implements propagate)
    baseline: bool = True  # also export the plain model through optimum (for `bench` on ONNX)
    verify: bool = True  # check the package against torch on this machine's provider
    weights: str = "full"  # full (the dtype's), or int8/int4 weight-only quantization (the baseline's too)
    block_size: int = 32  # inputs per quantization scale (int8/int4)
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL  # int8/int4: MatMulNBits' compute precision on the CPU (4: int8)
    # certify the package itself: its own continuations through ONNX Runtime against the original model's (minutes to
    # hours: every calibration prompt decoded per candidate); else the manifest carries calibration's torch bound
    certify: bool = False
    # certify: the bound to certify (None: calibration's target and epsilon). A quantized graph may keep less
    # consistency with the original model than the torch policy was certified for.
    target: float | None = None
    epsilon: float | None = None
    kv_layout: str = "auto"  # auto | buffer (preallocated, updated in place) | concat (past and new concatenated each step)

    def validate(self) -> None:
        check_choice("provider", self.provider, ONNX_PROVIDERS)
        check_choice("kv_layout", self.kv_layout, EXPORT_KV_LAYOUTS)
        check_choice("dtype", self.dtype, EXPORT_DTYPES)
        check_choice("weights", self.weights, EXPORT_WEIGHTS)
        check_block_size(self.block_size)
        check_accuracy_level(self.accuracy_level)
        for name in ("target", "epsilon"):
            if getattr(self, name) is not None:
                if not self.certify:
                    raise DyninferError(
                        f"{option(name)} is the bound {option('certify')} certifies; add {option('certify')} or leave it out"
                    )
                check_between(name, getattr(self, name), 0.0, 1.0)
        for name in ("block_size", "accuracy_level"):
            if self.weights == "full" and getattr(self, name) != getattr(ExportConfig, name):
                raise DyninferError(f"{option(name)} is for {option('weights')} int8 or int4; leave it out or quantize")
        if self.kv_mode is not None:
            check_choice("kv_mode", self.kv_mode, KV_MODES)

    def package_dir(self, artifact: str | os.PathLike) -> Path:
        return Path(self.out) if self.out else Path(artifact) / PACKAGE_DIR


@dataclass
class StopConfig(PlacementOptions):
    """`dyninfer stop`: fit and certify a stop rule for completions (corpus prefixes) or reasoning (problems)."""

    workload: str = COMPLETION  # completion: a corpus's prefixes; reasoning: problems with answers
    model: str = DEFAULT_MODEL
    data: str | None = None  # None: builtin:stdlib-code (completion) or builtin:arithmetic (reasoning)
    field: str | None = None
    seed: int = 0
    signal: str = "auto"  # auto: the signal that saves most on the fit split at the target
    target: float = 0.95  # value (completion) or right answers (reasoning) kept
    epsilon: float = 0.05
    condition: str = "valued"  # the guarantee is about units with something to lose (valued) or all units
    value_unit: str = "tokens"  # completion value: the matching prefix in tokens, characters or lines
    prompt_tokens: int = 64  # completion
    new_tokens: int = 64  # completion length
    fit_prompts: int = 64  # units that choose the signal and the candidate thresholds
    prompts: int = 192  # calibration units (Learn-then-Test's examples)
    heldout_prompts: int = 64  # units that report what the certified rule does
    batch_size: int = 16
    mode: str = "full"  # the generation it is certified on: full, or early-exit with the artifact's exits
    shots: int = 0  # reasoning: worked examples in the prompt
    probe_tokens: int = 6  # reasoning: tokens a trial answer may take
    probe_at: str = "auto"  # reasoning: probe at sentence or line ends (auto: the one that saves most on the fit units)
    chain_tokens: int = 160  # reasoning: the chain's token budget

    def resolved_data(self) -> str:
        return self.data or (BUILTIN_CODE if self.workload == COMPLETION else BUILTIN_COT)

    def draw(self) -> StopDraw:
        """Where the rule's units come from (the artifact records it: bench draws the held-out units again)."""
        return StopDraw(
            self.workload,
            self.resolved_data(),
            self.field,
            self.seed,
            self.fit_prompts,
            self.prompts,
            self.heldout_prompts,
            self.prompt_tokens,
            self.new_tokens,
            self.shots,
        )

    def validate(self) -> None:
        self.placement().validate()
        _check_seed(self)
        check_choice("workload", self.workload, STOP_WORKLOADS)
        check_choice("signal", self.signal, ("auto", *STOP_SIGNALS[self.workload]))
        check_choice("condition", self.condition, STOP_CONDITIONS)
        check_choice("value_unit", self.value_unit, STOP_VALUE_UNITS)
        check_choice("mode", self.mode, STOP_MODES)
        check_choice("probe_at", self.probe_at, ("auto", *STOP_PROBE_SITES))
        check_between("target", self.target, 0.0, 1.0)
        check_between("epsilon", self.epsilon, 0.0, 1.0)
        for name, low in (
            ("prompt_tokens", 1),
            ("new_tokens", 1),
            ("fit_prompts", 1),
            ("prompts", 1),
            ("heldout_prompts", 1),
            ("batch_size", 1),
            ("shots", 0),
            ("probe_tokens", 1),
            ("chain_tokens", 1),
        ):
            check_at_least(name, getattr(self, name), low)
        defaults = StopConfig()
        only = {COMPLETION: ("prompt_tokens", "new_tokens", "value_unit"), REASONING: ("shots", "probe_tokens", "chain_tokens", "probe_at")}
        for workload, names in only.items():
            for name in names:
                if workload != self.workload and getattr(self, name) != getattr(defaults, name):
                    raise DyninferError(f"{option(name)} is for {option('workload')} {workload}; leave it out or change the workload")

    def target_path(self, out: str | os.PathLike) -> Path:
        return check_output_dir(out)


@dataclass
class RunConfig(PlacementOptions):
    mode: str = "early-exit"  # early-exit, speculative (lossless; torch backend) or full
    backend: str = "torch"  # torch, or onnx: the package made by `export`
    provider: str | None = None  # onnx backend: cuda or cpu (None: the package's own)
    max_new_tokens: int = 64
    sample: bool = False
    temperature: float = 0.8
    seed: int = 0
    raw: bool = False  # do not wrap the prompt in the model's chat template
    model: str | None = None  # load the base model from here instead (same weights)
    kv_mode: str | None = None  # override the policy's KV mode
    # speculative: draft with the exit after this layer (None: planned from the artifact's measured agreement and
    # this machine's step costs, else 70% of the depth)
    draft_layer: int | None = None
    draft_threshold: float = 0.5  # speculative: keep drafting while the draft's max probability reaches this
    stop: str | None = None  # obey the artifact's certified stop rule for this workload (completion, reasoning)

    def validate(self) -> None:
        self.placement().validate()
        _check_seed(self)
        check_choice("mode", self.mode, RUN_MODES)
        _check_stop(self)
        check_choice("backend", self.backend, RUN_BACKENDS)
        if self.provider is not None:
            check_choice("provider", self.provider, ONNX_PROVIDERS)
        if self.kv_mode is not None:
            check_choice("kv_mode", self.kv_mode, KV_MODES)
        check_at_least("max_new_tokens", self.max_new_tokens, 1)
        check_positive("temperature", self.temperature)
        check_between("draft_threshold", self.draft_threshold, 0.0, 1.0, low_open=False, high_open=False)
        if self.draft_layer is not None:
            check_at_least("draft_layer", self.draft_layer, 1)
        if self.backend == "onnx" and self.mode == "speculative":
            raise DyninferError(
                f"the ONNX backend runs {option('mode')} early-exit or full; speculative runs with {option('backend')} torch"
            )
        _refuse_unused(self, RunConfig())


@dataclass
class BenchConfig(PlacementOptions):
    data: str | None = None  # prompt source; None: the calibration's data
    field: str | None = None
    prompts: int = 8
    prompt_tokens: int | None = None  # None: the calibration's (generation risk), else 64
    new_tokens: int | None = None  # None: the calibration's (generation risk), else 64
    seed: int = 0
    model: str | None = None  # load the base model from here instead (same weights)
    kv_mode: str | None = None  # override the policy's KV mode
    # speculative mode: draft with the exit after this layer (None: planned from the artifact's measured agreement
    # and this machine's step costs, else 70% of the depth)
    draft_layer: int | None = None
    draft_threshold: float = 0.5  # speculative mode: keep drafting while the draft's max probability reaches this
    backend: str = "torch"  # torch, or onnx: the exported package against optimum's ORT model
    package: str | None = None  # onnx backend: the exported package (None: ARTIFACT/onnx)
    provider: str | None = None  # onnx backend: cuda or cpu (None: the package's own)
    min_speedup: float | None = None  # gate on the gated mode's measured speedup
    min_consistency: float | None = None  # gate on its token consistency with the baseline
    stop: str | None = None  # benchmark the artifact's stop rule for this workload (time per request, value kept)
    memory: bool = True  # onnx backend: each row's peak RSS, from a process of its own (seconds a row)

    def validate(self) -> None:
        self.placement().validate()
        _check_seed(self)
        if self.stop is not None:
            check_choice("stop", self.stop, STOP_WORKLOADS)
            for name in ("data", "field", "prompt_tokens", "min_consistency", "draft_layer", "kv_mode"):
                if getattr(self, name) is not None:
                    raise DyninferError(
                        f"{option(name)} does not apply to {option('stop')}: it benchmarks the rule on its own held-out units"
                    )
            if self.backend != "torch":
                raise DyninferError(
                    f"{option('stop')} benchmarks on {option('backend')} torch; `run` with {option('backend')} onnx obeys a package's rule"
                )
        for name in ("prompts", "prompt_tokens", "new_tokens"):
            if getattr(self, name) is not None:
                check_at_least(name, getattr(self, name), 1)
        check_choice("backend", self.backend, RUN_BACKENDS)
        if self.provider is not None:
            check_choice("provider", self.provider, ONNX_PROVIDERS)
        if self.kv_mode is not None:
            check_choice("kv_mode", self.kv_mode, KV_MODES)
        if self.draft_layer is not None:
            check_at_least("draft_layer", self.draft_layer, 1)
        check_between("draft_threshold", self.draft_threshold, 0.0, 1.0, low_open=False, high_open=False)
        if self.min_speedup is not None:
            check_positive("min_speedup", self.min_speedup)
        if self.min_consistency is not None:
            check_between("min_consistency", self.min_consistency, 0.0, 1.0, low_open=False, high_open=False)
        _refuse_unused(self, BenchConfig())


def _check_stop(config) -> None:
    """A stop rule is certified on greedy decoding, one prompt at a time, in the full or early-exit mode."""
    if config.stop is None:
        return
    check_choice("stop", config.stop, STOP_WORKLOADS)
    if config.mode == "speculative" or getattr(config, "sample", False):
        raise DyninferError(
            f"{option('stop')} obeys a rule certified on greedy decoding in the full or early-exit mode; "
            "drop it, or the sampling or speculation"
        )


def _refuse_unused(config, defaults) -> None:
    """Refuse an option set away from its default where the chosen mode or backend never reads it (it would be
    silently ignored)."""
    unused = []
    mode, backend, sample = getattr(config, "mode", "speculative"), config.backend, getattr(config, "sample", True)
    if mode != "speculative":
        unused += [(name, f"{option('mode')} {mode}") for name in ("draft_layer", "draft_threshold")]
    if backend == "onnx":
        unused += [(name, f"{option('backend')} onnx (the package runs the KV mode it was exported with)") for name in ("kv_mode",)]
    else:
        unused += [(name, f"{option('backend')} {backend}") for name in ("provider", "package")]
    if not sample:
        unused.append(("temperature", "greedy decoding (pass `sample` to sample)"))
    for name, where in unused:
        if hasattr(config, name) and getattr(config, name) != getattr(defaults, name):
            raise DyninferError(f"{option(name)} does not apply to {where}; leave it out or change the mode")


def audit_stop(workload: str) -> StopConfig:
    """The audit's stop check (completion units follow the calibration's: `AuditConfig.stop_config`)."""
    check_choice("stop", workload, STOP_WORKLOADS)
    return StopConfig(workload=workload, fit_prompts=32, prompts=128, heldout_prompts=32)


def _quick_probe() -> ProbeConfig:
    # Sizes from measured curves (benchmarks/audit_defaults.py, docs/audit.md): 512 probe tokens read the oracle
    # saving within about a point of 2,048 tokens' in a quarter of the time; lens steps past 30 lower the
    # validation KL a little and leave the saving where it is.
    return ProbeConfig(tokens=512, lens_train_tokens=4096, lens_steps=30)


def _quick_calibrate() -> CalibrateConfig:
    # 0.99 needs at least 299 calibration prompts at epsilon 0.05 (ltt.min_examples): more than the bundled corpus
    # offers at the default window length, so the extra target is 0.9.
    return CalibrateConfig(fit_tokens=2048, heldout_tokens=1024, lens_train_tokens=4096, lens_steps=30, extra_targets=(0.9,))


def audit_steering(method: str) -> ExtractConfig:
    """The audit's steering check: a direction from 32 worked examples, 8 held-out questions."""
    return ExtractConfig(method=method, examples=32, heldout=8)


@dataclass
class AuditConfig(PlacementOptions):
    """The audit: what every stage shares (model, data, windows, seed, lens, where it runs), each stage's own
    Config, and the CI gates. The stage Configs' defaults are sized so the bundled model's audit takes minutes
    on 2 CPU cores (docs/audit.md says how many); the shared fields override theirs when a stage runs."""

    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    field: str | None = None
    seq_len: int = 256  # also the profile's context
    seed: int = 0
    lens: str = TUNED  # tuned: trains (or reuses) a tuned lens; logit: training-free and faster
    probe: ProbeConfig = dataclasses.field(default_factory=_quick_probe)
    profile: ProfileConfig = dataclasses.field(default_factory=lambda: ProfileConfig(warmup=2, repeats=10))
    calibrate: CalibrateConfig = dataclasses.field(default_factory=_quick_calibrate)  # its `target`: the gates' policy
    prune: PruneConfig | None = None  # set: learn threshold masks first, so the rest audits the pruned model
    steer: ExtractConfig | None = None  # set: extract a CoT-length direction and sweep it (not applied)
    # The sweep's alphas default to STEER_ALPHAS[method]; 128 new tokens: the bundled model's chains run past 96.
    sweep: SweepConfig = dataclasses.field(default_factory=lambda: SweepConfig(alphas=(), questions=8, max_new_tokens=128))
    # set: fit and certify a stop rule too (completion prompts from the audit's data, or reasoning problems)
    stop: StopConfig | None = None
    export: bool = False
    # CI gates (None: not checked); `run` still writes the report when one fails, and the CLI exits 1.
    min_oracle_saving: float | None = None  # the best lens's oracle FLOP saving (probe)
    min_speedup: float | None = None  # predicted held-out speedup of the certified policy at the calibration target
    min_consistency: float | None = None  # held-out token consistency of that policy
    min_stop_saving: float | None = None  # held-out tokens saved by the certified stop rule (needs `stop`)

    def _shared(self) -> dict:
        return self.placed() | {"model": self.model, "data": self.data, "field": self.field, "seed": self.seed}

    def probe_config(self) -> ProbeConfig:
        lenses = (LOGIT, TUNED) if self.lens == TUNED else (LOGIT,)
        return dataclasses.replace(self.probe, **self._shared(), seq_len=self.seq_len, lenses=lenses)

    def profile_config(self) -> ProfileConfig:
        return dataclasses.replace(self.profile, **self._shared(), context=self.seq_len)

    def calibrate_config(self) -> CalibrateConfig:
        extra = tuple(t for t in self.calibrate.extra_targets if t != self.calibrate.target)
        return dataclasses.replace(self.calibrate, **self._shared(), seq_len=self.seq_len, lens=self.lens, extra_targets=extra)

    def prune_config(self) -> PruneConfig | None:
        return None if self.prune is None else dataclasses.replace(self.prune, **self._shared(), seq_len=self.seq_len)

    def extract_config(self) -> ExtractConfig | None:
        if self.steer is None:
            return None
        return dataclasses.replace(self.steer, **self.placed(), model=self.model, seed=self.seed)

    def stop_config(self) -> StopConfig | None:
        if self.stop is None:
            return None
        if self.stop.workload == REASONING:
            return dataclasses.replace(self.stop, **self.placed(), model=self.model, seed=self.seed)
        # completions of the audit's data in the setting its exits are certified for: the same prompt and
        # continuation lengths, as many calibration and held-out prompts, a quarter as many to fit on
        calibrate = self.calibrate
        return dataclasses.replace(
            self.stop,
            **self._shared(),
            prompt_tokens=calibrate.prompt_tokens,
            new_tokens=calibrate.new_tokens,
            prompts=calibrate.prompts,
            heldout_prompts=calibrate.heldout_prompts,
            fit_prompts=max(8, calibrate.prompts // 4),
        )

    def alphas(self) -> list[float]:
        return list(self.sweep.alphas or STEER_ALPHAS.get(self.steer.method if self.steer else "", ()))

    def sweep_config(self) -> SweepConfig | None:
        if self.steer is None:
            return None
        return dataclasses.replace(
            self.sweep,
            **self.placed(),
            method=self.steer.method,
            alphas=tuple(self.alphas()),
            model=self.model,
        )

    def validate(self) -> None:
        """Every stage's options, before any model loads."""
        for name in ("min_oracle_saving", "min_consistency", "min_stop_saving"):
            if getattr(self, name) is not None:
                check_between(name, getattr(self, name), 0.0, 1.0, low_open=False, high_open=False)
        if self.min_stop_saving is not None and self.stop is None:
            raise DyninferError(f"{option('min_stop_saving')} gates the stop rule: pass {option('stop')} too")
        if self.min_speedup is not None:
            check_positive("min_speedup", self.min_speedup)
        check_choice("lens", self.lens, (LOGIT, TUNED))
        if self.steer is not None:
            check_choice("steer", self.steer.method, STEER_METHODS)
        for config in (
            self.probe_config(),
            self.profile_config(),
            self.calibrate_config(),
            self.prune_config(),
            self.extract_config(),
            self.sweep_config(),
            self.stop_config(),
        ):
            if config is not None:
                config.validate()
