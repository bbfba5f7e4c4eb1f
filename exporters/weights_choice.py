"""Weights chosen by certification (`weights` auto): the fastest whose fidelity certifies, without spending the guarantee.

The candidates are fixed before any calibration prompt is read: the source GGUF's own blocks when the model was loaded
from a quantized GGUF whose blocks the package can carry, then int8 and int4 round-to-nearest. Each is built from the
same verified fp32 step graph and timed on this machine (a decode of synthetic tokens, exits disabled: no calibration
text), and the list is ordered from the slowest to the fastest, which is, for these schemes, from the most to the least
faithful. Certification then walks one fixed path (certification/fidelity.py: `certify_fidelity_path`): each
candidate with exits disabled in that order, then the exit thresholds on the fastest. Fixed-sequence testing stops at
the first setting that does not certify, and the last one before it ships: the chosen weights carry the same
guarantee as a single package would.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyninfer.core.errors import DyninferError
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.exporters.quantize import quantize_weights
from dyninfer.exporters.source_blocks import SOURCE, SourceWeights
from dyninfer.runtime.decoding import generate
from dyninfer.runtime.onnx_decoder import OnnxDecoder
from dyninfer.runtime.package_format import MODEL_FILE, PackageManifest

CANDIDATES_DIR = "weight-candidates"  # inside the staged package while the candidates are built and certified
ROUNDED = ("int8", "int4")  # round-to-nearest candidates after the source's blocks, in the order built
SPEED_PROMPT, SPEED_STEPS, SPEED_REPEATS = 16, 24, 3  # the timing: a 16-token prompt, 24 decode steps, best of 3


@dataclass
class WeightsCandidate:
    """One candidate package beside the staged one: its weights, folder, manifest (not written) and decode speed."""

    weights: str
    directory: Path
    manifest: PackageManifest
    decode_tokens_per_s: float = 0.0

    def summary(self) -> dict:
        return {"weights": self.weights, "decode_tokens_per_s": round(self.decode_tokens_per_s, 2)}


def candidate_weights(source: SourceWeights | None) -> list[str]:
    """The candidate list, fixed before calibration: the source's blocks (when carriable), then int8 and int4."""
    return ([SOURCE] if source is not None else []) + list(ROUNDED)


def build_candidates(
    package: Path,
    manifest: PackageManifest,
    source: SourceWeights | None,
    block_size: int,
    accuracy_level: int,
    provider: str,
    progress: ProgressFn | None = None,
) -> list[WeightsCandidate]:
    """Each candidate quantized from the staged package's graph into a folder of its own and timed; ordered from the
    slowest to the fastest decode (the certification path's order)."""
    report = progress or silent
    names = candidate_weights(source)
    built = []
    for i, weights in enumerate(names):
        report(f"building weight candidates ({weights})", i, len(names))
        directory = package / CANDIDATES_DIR / weights
        directory.mkdir(parents=True)
        for file in package.iterdir():
            if file.is_file() and file.name.startswith(MODEL_FILE):
                shutil.copyfile(file, directory / file.name)
        quantized = quantize_weights(directory / MODEL_FILE, weights, block_size, accuracy_level, source if weights == SOURCE else None)
        candidate = WeightsCandidate(weights, directory, dataclasses.replace(manifest, weights=quantized, notes=list(manifest.notes)))
        candidate.decode_tokens_per_s = decode_speed(OnnxDecoder(directory, provider=provider, manifest=candidate.manifest))
        built.append(candidate)
    report("building weight candidates", len(names), len(names))
    return sorted(built, key=lambda c: c.decode_tokens_per_s)


def decode_speed(runtime: OnnxDecoder) -> float:
    """Decode tokens/s with exits disabled on synthetic tokens (no text the certification reads), batch 1, best of a few."""
    prompt = np.random.default_rng(0).integers(0, runtime.manifest.vocab_size, (1, SPEED_PROMPT), dtype=np.int64)
    best = 0.0
    for _ in range(SPEED_REPEATS):
        run = generate(runtime, prompt, SPEED_STEPS + 1, mode="full")
        decode = run.seconds - run.prefill_seconds
        best = max(best, SPEED_STEPS / decode if decode > 0 else 0.0)
    return best


def install_candidate(package: Path, candidate: WeightsCandidate) -> None:
    """The chosen candidate's graph replaces the staged package's; every candidate folder goes."""
    for file in package.iterdir():
        if file.is_file() and file.name.startswith(MODEL_FILE):
            file.unlink()
    for file in candidate.directory.iterdir():
        shutil.move(str(file), package / file.name)
    shutil.rmtree(package / CANDIDATES_DIR)


def chosen_candidate(candidates: list[WeightsCandidate], chosen: int | None) -> WeightsCandidate:
    """The certified candidate; when none certified, the most faithful one (slowest), which the certificate says."""
    if not candidates:
        raise DyninferError("no weight candidate was built")
    return candidates[0 if chosen is None else chosen]
