"""An exported package as a `Decoder` (runtime/decoding.py): its step through ONNX Runtime, numpy only.

Providers: the CUDA execution provider when asked for (the package's default), falling back to the CPU one
with a note saying why. Each step runs through an IOBinding. In the buffered KV layout each layer's K/V live
in one buffer allocated per generation, sized for the prompt, the new tokens and any reasoning probe, and
bound as both the step's past input and its present output: ONNX Runtime writes the new positions in place.
In the concatenated layout each step's present K/V stay where ONNX Runtime put them (device memory on CUDA)
and are bound as the next past. Either way only the token ids, the threshold (and the positions) go in, and
the greedy token, exit layer and confidences come out: the logits are fetched only when sampling or asked for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from dyninfer.compressors.stop_obey import Stopper, stopper_for
from dyninfer.core.choices import EARLY_EXIT, FULL, PACKAGE_RUN_MODES, PROVIDER_NAMES
from dyninfer.core.errors import DyninferError, check_choice, option
from dyninfer.runtime import decoding
from dyninfer.runtime.decoding import GenerationResult, Step
from dyninfer.runtime.onnx_session import create_session
from dyninfer.runtime.package_format import (
    EXIT_CONFIDENCE,
    EXIT_LAYER,
    INPUT_IDS,
    LOGITS,
    NEXT_TOKEN_OUTPUT,
    PAST_PREFIX,
    POSITIONS_INPUT,
    PRESENT_PREFIX,
    STOP_OUTPUT,
    THRESHOLD_INPUT,
    PackageCertificate,
    PackageManifest,
    find_package,
    read_package,
)

_NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass
class PackageState:
    """A generation's KV cache in ONNX Runtime: the buffers (buffered layout) or the last present values."""

    binding: object  # the session's IOBinding
    past: list  # OrtValues, key and value per layer
    filled: int  # positions the past holds
    # buffered layout: whether the binding holds the buffers as past and present (they stay bound between steps)
    bound: bool = False


class OnnxDecoder:
    """Greedy or sampled generation with an exported dynamic model."""

    def __init__(self, package, provider: str | None = None, threads: int | None = None, manifest: PackageManifest | None = None):
        """`manifest`: a package being built (not written yet); else the one at `package` is read and checked."""
        self.path = find_package(package)
        self.manifest = manifest if manifest is not None else read_package(self.path)
        self.num_layers = self.manifest.num_layers
        self.dtype = _NUMPY_DTYPES[self.manifest.dtype]
        self.buffered = self.manifest.kv_layout == "buffer"  # preallocated buffers, updated in place
        self.session, problem = create_session(self.path / self.manifest.model_file, provider or self.manifest.provider, threads)
        self.notes = [f"{problem}; fell back to CPUExecutionProvider"] if problem else []
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider == PROVIDER_NAMES["cuda"] else "cpu"
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith(PAST_PREFIX)]
        self.present_names = [n for n in self.output_names if n.startswith(PRESENT_PREFIX)]
        self.step_names = [n for n in self.output_names if not n.startswith(PRESENT_PREFIX)]
        self.can_select_rows = True
        self.ort_seconds = 0.0  # time spent inside ONNX Runtime's runs, for the share of a step spent outside it
        self.greedy_output = NEXT_TOKEN_OUTPUT in self.output_names  # format 3: greedy decoding leaves the logits on the device
        if len(self.past_names) != 2 * self.num_layers or STOP_OUTPUT not in self.output_names:
            raise DyninferError(f"the graph of the package at '{self.path}' does not match its manifest; re-run `dyninfer export`")

    # -- what the package carries ---------------------------------------------------------
    @property
    def certificate(self) -> PackageCertificate | None:
        """The consistency bound the package ships with (None: none was computed)."""
        return self.manifest.certificate

    def certificate_notes(self, mode: str) -> list[str]:
        """What a report of a run in `mode` should say about the bound: when it is about another graph."""
        certificate = self.certificate
        if mode != EARLY_EXIT or certificate is None or certificate.on_package:
            return []
        return [f"the package's bound: {certificate.statement()} (export with {option('certify')} to certify this graph)"]

    @property
    def eos_token_id(self) -> int | None:
        return self.manifest.eos_token_id

    def stopper(self, workload: str) -> Stopper:
        """A fresh stopper obeying the package's `workload` stop rule (the one `dyninfer stop` certified)."""
        rule = self.manifest.stop.get(workload)
        if rule is None:
            raise DyninferError(
                f"the package at '{self.path}' carries no {workload} stop rule; run `dyninfer stop` with {option('workload')} {workload} "
                "into the artifact, then export it again"
            )
        return stopper_for(rule.policy, rule.vocabulary)

    # -- the Decoder protocol ---------------------------------------------------------------
    def exit_threshold(self, mode: str, override: float | None = None) -> float | None:
        check_choice("mode", mode, PACKAGE_RUN_MODES)
        policy = self.manifest.policy
        if mode == FULL or (override is None and (policy is None or policy.threshold is None)):
            return None
        return float(override if override is not None else policy.threshold)

    def prefill(self, prompts, capacity: int, *, logits: bool, scores: bool) -> tuple[PackageState, Step]:
        import onnxruntime as ort

        ids = np.asarray(prompts, dtype=np.int64)
        length = capacity if self.buffered else 0
        past = [
            ort.OrtValue.ortvalue_from_numpy(np.zeros((ids.shape[0], heads, length, dim), dtype=self.dtype), self.device)
            for heads, dim in self.manifest.kv_geometry
            for _ in range(2)
        ]
        state = PackageState(self.session.io_binding(), past, 0)
        return state, self.step(state, ids, None, logits=logits, scores=scores)

    def step(self, state: PackageState, tokens: np.ndarray, threshold: float | None, *, logits: bool, scores: bool) -> Step:
        """One run of the graph on `tokens` after the `filled` positions of `state`. With buffers, each is bound as the
        past input and the present output: ONNX Runtime writes the new positions into it, nothing else is copied.
        Unless `logits`, they stay where ONNX Runtime put them (device memory on CUDA) and only the token comes back."""
        ids = np.asarray(tokens, dtype=np.int64)
        binding = state.binding
        binding.bind_cpu_input(INPUT_IDS, ids)
        limit = self.manifest.exits_disabled_threshold if threshold is None else threshold
        binding.bind_cpu_input(THRESHOLD_INPUT, np.array(limit, dtype=np.float32))
        if self.buffered:
            binding.bind_cpu_input(POSITIONS_INPUT, np.arange(state.filled + ids.shape[1], dtype=np.int64))
        on_device = not logits and self.greedy_output
        # fresh outputs each step (a bound output would be written over by the next run, under arrays already returned)
        for name in self.step_names:
            binding.bind_output(name, self.device if name == LOGITS and on_device else "cpu")
        if not (self.buffered and state.bound):  # host time a step: the buffers stay bound for the whole generation
            self._bind_state(state)
        started = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.ort_seconds += time.perf_counter() - started
        outputs = dict(zip(self.output_names, binding.get_outputs()))
        # The buffers themselves stay the past, not the binding's outputs: those views die with the next binding.
        if not self.buffered:
            state.past = [outputs[name] for name in self.present_names]
        state.filled += ids.shape[1]
        values = None if on_device else outputs[LOGITS].numpy()
        greedy = outputs[NEXT_TOKEN_OUTPUT].numpy() if self.greedy_output else values.argmax(-1)  # format 2: no next_token
        confidence = float(outputs[EXIT_CONFIDENCE].numpy())
        return Step(
            greedy.astype(np.int64).reshape(-1),
            int(outputs[EXIT_LAYER].numpy()),
            confidence if confidence >= 0 else None,
            values,
            outputs[STOP_OUTPUT].numpy().astype(np.float64).reshape(-1),
        )

    def _bind_state(self, state: PackageState) -> None:
        """Bind the past and, buffered, the same buffers as present outputs (else fresh ones)."""
        binding = state.binding
        for name, value in zip(self.past_names, state.past):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(self.present_names, state.past):
            if self.buffered:
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_output(name, self.device)
        state.bound = self.buffered

    def fork(self, state: PackageState, rows: list[int] | None = None) -> PackageState:
        """A copy a probe may consume. The whole batch shares the buffers: a probe writes only positions past `filled`,
        which the generation overwrites as it goes on."""
        if rows is not None:
            return self.select(state, rows)
        return PackageState(state.binding, list(state.past), state.filled, state.bound)

    def select(self, state: PackageState, rows: list[int]) -> PackageState:
        import onnxruntime as ort

        past = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[rows]), self.device) for value in state.past]
        return PackageState(self.session.io_binding(), past, state.filled)

    def as_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return tokens

    def host(self, logits) -> np.ndarray:
        return np.asarray(logits)

    def generate(self, input_ids, max_new_tokens: int = 64, **options) -> GenerationResult:
        """`runtime.decoding.generate` on this package (its options)."""
        return decoding.generate(self, np.asarray(input_ids, dtype=np.int64), max_new_tokens, **options)
