"""Run an exported dyninfer ONNX package with ONNX Runtime: numpy and onnxruntime only, no torch.

Providers: the CUDA execution provider when asked for (the package's default), falling back
to the CPU one with a note saying why. The decode loop uses IOBinding. In the buffered KV
layout (exporters/attention.py) each layer's K/V live in one buffer allocated per generation,
sized for the prompt, the new tokens and any reasoning probe, and bound as both the step's past
input and its present output: ONNX Runtime writes the new positions in place. In the older
concatenated layout each step's present K/V stay where ONNX Runtime put them (device memory on
CUDA) and are bound as the next past. Either way only the token ids, the threshold (and the
positions) go in, and the greedy token, exit layer and confidences come out: the logits are
fetched only when sampling or asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dyninfer.compressors.stop_rule import (
    REASONING,
    CompletionStopper,
    ProbeVocabulary,
    ReasoningStopper,
    StopPolicy,
    TrialAnswer,
    read_answer,
    stop_summary,
)
from dyninfer.core.artifact_files import inside, relative_inside
from dyninfer.core.errors import DyninferError, check_positive, option
from dyninfer.core.generation import GenerationResult
from dyninfer.exporters.certificate import PackageCertificate

PACKAGE_MANIFEST = "dyninfer-onnx.json"
PACKAGE_FORMAT = "dyninfer-onnx"
# 2: the step's stop_confidence output, and the stop rules in the manifest; 3: kv_layout and the next_token output
PACKAGE_VERSION = 3
STOP_OUTPUT = "stop_confidence"
NEXT_TOKEN_OUTPUT = "next_token"  # the greedy token, so greedy decoding brings no logits to the host
KV_LAYOUTS = ("concat", "buffer")  # how a package's step takes its KV cache (exporters/step.py)
POSITIONS_INPUT = "positions"  # buffered KV layout: the positions the buffers hold after the step (its length is read)
MODES = ("early-exit", "full")
PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
_NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def read_package(path) -> dict:
    """The validated manifest of the package at `path` (a one-line DyninferError if unusable)."""
    path = find_package(path)
    manifest_path = path / PACKAGE_MANIFEST
    if not manifest_path.is_file():
        hint = " (run `dyninfer export` on the artifact first)" if (path / "dyninfer.json").is_file() else ""
        raise DyninferError(f"'{path}' is not a dyninfer ONNX package: no {PACKAGE_MANIFEST}{hint}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DyninferError(f"the package manifest '{manifest_path}' is damaged ({exc}); re-run `dyninfer export`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise DyninferError(f"'{manifest_path}' is not a dyninfer ONNX package manifest; re-run `dyninfer export`")
    if manifest.get("version", 0) > PACKAGE_VERSION:
        raise DyninferError(
            f"the package at '{path}' was made by a newer dyninfer (format version {manifest['version']}); upgrade dyninfer"
        )
    if manifest.get("kv_layout", "concat") not in KV_LAYOUTS:
        raise DyninferError(
            f"the package at '{path}' has KV layout {manifest['kv_layout']!r}, which this dyninfer does not know "
            f"({', '.join(KV_LAYOUTS)}); re-run `dyninfer export`"
        )
    files = manifest.get("files", {})
    for name in [manifest.get("model_file"), *files]:
        if not isinstance(name, str) or not relative_inside(name) or not inside(path, path / name):
            raise DyninferError(
                f"the package at '{path}' names the file {name!r}, which is not a file inside the package (an absolute path, "
                "`..` or a link out of it); re-run `dyninfer export`"
            )
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise DyninferError(f"the package at '{path}' lacks '{name}'; re-run `dyninfer export`")
        if file.stat().st_size != size:
            raise DyninferError(
                f"'{file}' has {file.stat().st_size} bytes, the manifest says {size}: the package "
                "is damaged or incomplete; re-run `dyninfer export`"
            )
    return manifest


def find_package(path) -> Path:
    """The package at `path`, or in `path`/onnx when `path` is the artifact it was exported from."""
    path = Path(path)
    if not path.exists():
        raise DyninferError(f"'{path}' does not exist; pass an exported package or its artifact directory")
    if (path / PACKAGE_MANIFEST).is_file() or not (path / "onnx" / PACKAGE_MANIFEST).is_file():
        return path
    return path / "onnx"


def session_providers(provider: str) -> list[str]:
    if provider not in PROVIDERS:
        raise DyninferError(f"`provider` must be one of {', '.join(PROVIDERS)}, got '{provider}'")
    return [PROVIDERS["cuda"], PROVIDERS["cpu"]] if provider == "cuda" else [PROVIDERS["cpu"]]


def create_session(model, provider: str, threads: int | None = None):
    """An InferenceSession for `model` (a path or serialized bytes) on `provider`, falling back
    to CPU; returns (session, why `provider` is not the one running, or None)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not isinstance(model, bytes):
        check_external_data(Path(model))
    wanted = session_providers(provider)
    available = ort.get_available_providers()
    try:
        # A CUDA EP that cannot start logs several lines from C++; our note says it once.
        with silenced_native_stderr(enabled=len(wanted) > 1):
            session = ort.InferenceSession(
                model if isinstance(model, bytes) else str(model), options, providers=[p for p in wanted if p in available]
            )
    except Exception as exc:
        raise DyninferError(f"ONNX Runtime could not load '{model}': {' '.join(str(exc).split())[:300]}") from None
    if wanted[0] not in available:
        return session, f"this onnxruntime build has no {wanted[0]} (install onnxruntime-gpu)"
    if wanted[0] != session.get_providers()[0]:
        return session, f"{wanted[0]} could not start here (no CUDA device or driver)"
    return session, None


def check_external_data(model: Path) -> None:
    """Refuse a graph whose weights live in files outside its folder (an absolute path or `..` in a tensor's
    external-data location, or a link out): ONNX Runtime would read them."""
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:160]
        raise DyninferError(f"'{model}' is not a readable ONNX graph ({reason}); re-run `dyninfer export`") from None
    for tensor in _graph_tensors(proto.graph, [node for function in proto.functions for node in function.node]):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        if not relative_inside(location) or not inside(model.parent, model.parent / location):
            raise DyninferError(
                f"the graph '{model}' reads the weights of {tensor.name!r} from {location!r}, outside its folder; re-run `dyninfer export`"
            )


def _graph_tensors(graph, extra_nodes=()):
    """Every tensor a graph holds: its initializers and the tensors in its nodes' attributes, subgraphs (If branches)
    included."""
    yield from graph.initializer
    for node in [*graph.node, *extra_nodes]:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graph_tensors(subgraph)


@contextlib.contextmanager
def silenced_native_stderr(enabled: bool = True):
    """Discard what native code (ONNX Runtime's C++ logger) writes to file descriptor 2."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class OnnxDynamicModel:
    """Greedy or sampled generation with an exported dynamic model."""

    def __init__(self, package, provider: str | None = None, threads: int | None = None):
        self.path = find_package(package)
        self.manifest = read_package(self.path)
        self.num_layers = int(self.manifest["num_layers"])
        self.policy = self.manifest["policy"]
        self.disabled_threshold = float(self.manifest["exits_disabled_threshold"])
        self.dtype = _NUMPY_DTYPES[self.manifest["dtype"]]
        # "buffer": the past is one preallocated buffer a layer, updated in place (exporters/attention.py)
        self.kv_layout = self.manifest.get("kv_layout", "concat")
        self.session, problem = create_session(self.path / self.manifest["model_file"], provider or self.manifest["provider"], threads)
        self.notes = [f"{problem}; fell back to CPUExecutionProvider"] if problem else []
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider == PROVIDERS["cuda"] else "cpu"
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.input_names if n.startswith("past_key_values.")]
        self.present_names = [n for n in self.output_names if n.startswith("present.")]
        self.scalar_names = [n for n in self.output_names if not n.startswith("present.")]
        self.geometry = self.manifest["kv_geometry"]

    @property
    def certificate(self) -> PackageCertificate | None:
        """The consistency bound the package ships with (None: packages exported before certificates, or a policy
        calibrated on a teacher-forced risk)."""
        stored = self.manifest.get("certificate")
        return PackageCertificate.from_dict(stored) if isinstance(stored, dict) else None

    def certificate_notes(self, mode: str) -> list[str]:
        """What a report of a run in `mode` should say about the bound: when it is about another graph."""
        certificate = self.certificate
        if mode != "early-exit" or certificate is None or certificate.on_package:
            return []
        return [f"the package's bound: {certificate.statement()} (export with {option('certify')} to certify this graph)"]

    @property
    def eos_token_id(self) -> int | None:
        return self.manifest.get("eos_token_id")

    def stopper(self, workload: str):
        """A fresh stopper obeying the package's `workload` stop rule (the one `dyninfer stop` certified)."""
        rule = (self.manifest.get("stop") or {}).get(workload)
        if rule is None:
            raise DyninferError(
                f"the package at '{self.path}' carries no {workload} stop rule; run `dyninfer stop` with {option('workload')} {workload} "
                "into the artifact, then export it again"
            )
        if STOP_OUTPUT not in self.output_names:
            raise DyninferError(f"the package at '{self.path}' has no {STOP_OUTPUT} output (an older export); export it again")
        policy = StopPolicy.from_dict(rule["policy"])
        if workload == REASONING:
            return ReasoningStopper(policy, ProbeVocabulary.from_dict(rule.get("vocabulary") or {}))
        return CompletionStopper(policy)

    def _threshold(self, mode: str) -> float:
        if mode == "full" or self.policy.get("threshold") is None:
            return self.disabled_threshold
        return float(self.policy["threshold"])

    def generate(
        self,
        input_ids,
        max_new_tokens: int = 64,
        *,
        mode: str = "early-exit",
        sample: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
        eos_token_id: int | None = None,
        return_logits: bool = False,
        stop: CompletionStopper | ReasoningStopper | None = None,
        exit_threshold: float | None = None,
    ) -> GenerationResult:
        """`exit_threshold`: exit at this threshold instead of the policy's (early-exit mode; certification tries
        candidates)."""
        import onnxruntime as ort

        if mode not in MODES:
            raise DyninferError(f"the ONNX backend runs modes {', '.join(MODES)}, not '{mode}'")
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise DyninferError("the prompt is empty; give at least one token")
        if max_new_tokens < 1:
            raise DyninferError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
        if sample:
            check_positive("temperature", temperature)
        rng = np.random.default_rng(seed)
        batch = ids.shape[0]
        started = time.perf_counter()
        binding = self.session.io_binding()
        capacity = ids.shape[1] + max_new_tokens + (_probe_room(stop) if isinstance(stop, ReasoningStopper) else 0)
        length = capacity if self.kv_layout == "buffer" else 0
        past = [
            ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, heads, length, dim), dtype=self.dtype), self.device)
            for heads, dim in self.geometry
            for _ in range(2)
        ]
        filled = 0  # positions the past holds
        threshold = self._threshold(mode) if exit_threshold is None or mode == "full" else float(exit_threshold)
        if stop is not None and (sample or batch != 1):
            raise DyninferError("a stop rule runs greedy decoding with one prompt at a time")
        tokens, exits, confidences, all_logits = [], [], [], []
        step_ids, step_threshold = ids, self.disabled_threshold  # the prefill runs every layer
        ended = None
        need_logits = return_logits or sample
        while True:
            step = self._run(binding, step_ids, step_threshold, past, filled, need_logits)
            if return_logits:
                all_logits.append(step.logits)
            token = _sample(step.logits, temperature, rng) if sample else step.greedy
            if isinstance(stop, CompletionStopper) and stop.stops_before(step.stop_confidence):
                ended = "rule"
                break
            past, filled = step.present, filled + step_ids.shape[1]
            tokens.append(token)
            exits.append(step.exit_layer)
            confidences.append(step.exit_confidence if step.exit_confidence >= 0 else None)
            if len(tokens) >= max_new_tokens or _finished(tokens, eos_token_id):
                break
            if isinstance(stop, ReasoningStopper) and stop.is_boundary(int(token[0, 0])):
                trial = self._probe(binding, token, past, filled, stop)
                if stop.decide(len(tokens), trial):
                    tokens += [np.array([[t]], dtype=np.int64) for t in stop.vocabulary.suffix + trial.ids]
                    ended = "answered"
                    break
            step_ids, step_threshold = token, threshold
        shown = np.concatenate(tokens, axis=1) if tokens else np.zeros((batch, 0), dtype=np.int64)
        result = GenerationResult(shown, exits, confidences, time.perf_counter() - started, mode, self.num_layers, notes=list(self.notes))
        if stop is not None:
            result.stop = stop_summary(stop, ended or ("end of sequence" if _finished(tokens, eos_token_id) else "budget"), len(tokens))
        if return_logits:
            result.logits = all_logits
        return result

    def _probe(self, binding, token: np.ndarray, past: list, filled: int, stop: ReasoningStopper) -> TrialAnswer:
        """Feed the step's last token and the forced answer continuation at full depth from `past` (kept: the
        chain goes on from it; a buffer's positions past `filled` are overwritten later), then read the greedy
        answer."""
        vocabulary = stop.vocabulary
        step_ids = np.concatenate([token, np.array([vocabulary.suffix], dtype=np.int64)], axis=1)
        picked, step_confidences = [], []
        while True:
            step = self._run(binding, step_ids, self.disabled_threshold, past, filled)
            past, stop_confidence = step.present, step.stop_confidence
            filled += step_ids.shape[1]
            picked.append(int(step.greedy[0, 0]))
            step_confidences.append(stop_confidence)
            if not vocabulary.continues(picked[:-1], picked[-1]) or len(picked) == stop.policy.probe_tokens:
                break
            step_ids = np.array([[picked[-1]]], dtype=np.int64)
        ids, confidence = read_answer(step_confidences, picked, vocabulary)
        return TrialAnswer(ids, picked, confidence, len(vocabulary.suffix) + len(picked))

    def _run(self, binding, ids: np.ndarray, threshold: float, past: list, filled: int, need_logits: bool = False) -> Step:
        """One step on `ids` after the `filled` positions in `past`. With buffers, each is bound as the past input
        and the present output: ONNX Runtime writes the new positions into it, nothing else is copied. Unless
        `need_logits`, the logits stay where ONNX Runtime put them (device memory on CUDA) and only the greedy
        token comes to the host."""
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("exit_threshold", np.array(threshold, dtype=np.float32))
        if self.kv_layout == "buffer":
            binding.bind_cpu_input(POSITIONS_INPUT, np.arange(filled + ids.shape[1], dtype=np.int64))
        for name, value in zip(self.past_names, past):
            binding.bind_ortvalue_input(name, value)
        fetched_on_device = not need_logits and NEXT_TOKEN_OUTPUT in self.output_names
        for name in self.scalar_names:
            binding.bind_output(name, self.device if name == "logits" and fetched_on_device else "cpu")
        for name, value in zip(self.present_names, past):
            if self.kv_layout == "buffer":
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = dict(zip(self.output_names, binding.get_outputs()))
        logits = None if fetched_on_device else outputs["logits"].numpy()
        # older packages lack the stop (format 1) or next-token (format 2) output: computed here from the logits
        stop_confidence = float(outputs[STOP_OUTPUT].numpy()[0]) if STOP_OUTPUT in outputs else _max_probability(logits)
        greedy = outputs[NEXT_TOKEN_OUTPUT].numpy()[:, None] if NEXT_TOKEN_OUTPUT in outputs else logits.argmax(-1)[:, None]
        # The buffers themselves, not the binding's outputs: those views die with the next binding.
        present = past if self.kv_layout == "buffer" else [outputs[name] for name in self.present_names]
        exit_layer, confidence = int(outputs["exit_layer"].numpy()), float(outputs["exit_confidence"].numpy())
        return Step(logits, exit_layer, confidence, stop_confidence, present, greedy.astype(np.int64))


class Step(NamedTuple):
    """What one step of the package gives the decode loop."""

    logits: np.ndarray | None  # [batch, vocab]; None when left on the device (greedy decoding)
    exit_layer: int
    exit_confidence: float  # -1: no exit
    stop_confidence: float
    present: list  # the K/V to bind as the next past
    greedy: np.ndarray  # [batch, 1] the argmax token ids


def _probe_room(stop: ReasoningStopper) -> int:
    """Positions a reasoning probe may write past the chain: the forced suffix and the answer it reads."""
    return len(stop.vocabulary.suffix) + stop.policy.probe_tokens + 1


def _max_probability(logits: np.ndarray) -> float:
    row = logits[0].astype(np.float64)
    return float(1.0 / np.exp(row - row.max()).sum())


def _sample(logits: np.ndarray, temperature: float, rng) -> np.ndarray:
    scaled = logits.astype(np.float64) / max(temperature, 1e-5)
    scaled -= scaled.max(-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(-1, keepdims=True)
    return np.array([[rng.choice(probs.shape[-1], p=row)] for row in probs], dtype=np.int64)


def _finished(tokens: list[np.ndarray], eos_token_id: int | None) -> bool:
    if eos_token_id is None:
        return False
    done = np.zeros_like(tokens[0], dtype=bool)
    for t in tokens:
        done |= t == eos_token_id
    return bool(done.all())
