"""`export`: the artifact's dynamic model as an ONNX Runtime package (default `ARTIFACT/onnx/`).

`run` checks every option and the output path before the model loads, then builds, verifies and
swaps in the package (see `exporters.onnx_export`). With `certify` the staged package is certified on its own
continuations before it replaces anything (`certification.package`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from dyninfer.certification.package import certify_package, certify_package_fidelity
from dyninfer.core import stages
from dyninfer.core.choices import AUTO_WEIGHTS, FIDELITY_RISK, GENERATION_RISK, TOP1
from dyninfer.core.errors import DyninferError, option
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.exporters.onnx_export import ExportResult, export_dynamic, preflight
from dyninfer.exporters.source_blocks import SOURCE, SourceWeights
from dyninfer.jobs.configs import ExportConfig
from dyninfer.runtime.loader import LoadedDynamic, load_dynamic, model_state
from dyninfer.runtime.onnx_decoder import OnnxDecoder
from dyninfer.runtime.package_format import PackageCertificate, PackageManifest


def run(config: ExportConfig, artifact: str | os.PathLike, progress: ProgressFn | None = None) -> ExportResult:
    """Export the artifact at `artifact`; returns what was written and how it verified."""
    config.validate()
    target = config.package_dir(artifact)
    preflight(target, config.provider, config.dtype, config.verify or config.certify)
    report = progress or silent
    steps = (4 if config.baseline else 3) + (config.weights != "full") + config.certify
    report("loading the dynamic model", 0, steps)
    dyn = load_dynamic(str(artifact), config.model, require_policy=True, kv_mode=config.kv_mode)
    # the source's blocks: what `source` ships, and one of auto's candidates when the model came from a GGUF
    source = source_weights(dyn, required=config.weights == SOURCE) if config.weights in (SOURCE, AUTO_WEIGHTS) else None
    certify = package_certifier(dyn, config, progress) if config.certify else None
    return export_dynamic(
        dyn,
        target,
        provider=config.provider,
        dtype=config.dtype,
        baseline=config.baseline,
        verify=config.verify,
        weights=config.weights,
        source=source,
        block_size=config.block_size,
        accuracy_level=config.accuracy_level,
        certify=certify,
        kv_layout=config.kv_layout,
        progress=progress,
    )


def source_weights(dyn: LoadedDynamic, required: bool = True) -> SourceWeights | None:
    """The quantized GGUF the artifact's model was loaded from; for any other source, refused (`required`) or None."""
    source = Path(dyn.loaded.source)
    if source.suffix.lower() != ".gguf" or not source.is_file():
        if not required:
            return None
        raise DyninferError(
            f"{option('weights')} {SOURCE} carries a quantized GGUF's own blocks, but the model was loaded from '{dyn.loaded.source}'; "
            f"use {option('weights')} int8 or int4"
        )
    config = dyn.loaded.model.config
    heads = getattr(config, "num_attention_heads", None)
    return SourceWeights(source, (heads, getattr(config, "num_key_value_heads", None) or heads) if heads else None)


def package_certifier(
    dyn: LoadedDynamic, config: ExportConfig, progress: ProgressFn | None
) -> Callable[[list], tuple[PackageCertificate, int | None]]:
    """Certification of a package of `dyn` on `config.provider`, against calibration's cached continuations of the original
    model and along its candidate thresholds, on `config.certify_risk` at `config.target` and `config.epsilon` (None:
    calibration's); refused before any export work when the artifact cannot support it."""
    calibration = dyn.calibration
    certificate = None if calibration is None else calibration.certificate
    where = dyn.where
    if certificate is None or not certificate.on_prompts:
        risk = certificate.risk if certificate is not None else "no"
        raise DyninferError(
            f"{option('certify')} needs a calibration on prompts and the full model's continuations: {where} was calibrated with "
            f"the {risk} risk; run `dyninfer calibrate` into it with the {GENERATION_RISK} or {FIDELITY_RISK} risk first"
        )
    group = dyn.artifact.tensors.get(stages.GENERATION_GROUP, {})
    sets_of = {what: (group.get(f"{what}.prompts"), group.get(f"{what}.continuations")) for what in ("calibration", "heldout")}
    if any(tensor is None for tensor in sets_of["calibration"]):
        raise DyninferError(
            f"{where} keeps no calibration continuations; calibrate into it again with the {GENERATION_RISK} or {FIDELITY_RISK} risk"
        )
    if calibration.continuations_key != model_state(dyn.session, dyn.artifact):
        raise DyninferError(
            f"{where} changed since calibration (steering, pruning or tuning): its continuations are not this model's; "
            "run `dyninfer calibrate` into it again"
        )
    new_tokens = certificate.new_tokens or sets_of["calibration"][1].shape[1]

    def cut(pair):  # the stored continuations may be longer than the calibration's (an earlier, longer run)
        prompts, continuations = pair
        return None if prompts is None or continuations is None else (prompts.numpy(), continuations[:, :new_tokens].numpy())

    def certify(candidates: list[tuple[Path, PackageManifest, dict]]) -> tuple[PackageCertificate, int | None]:
        """`candidates`: the staged package, or `weights` auto's candidates slowest first ((folder, manifest, label))."""
        runtimes = [(OnnxDecoder(folder, provider=config.provider, manifest=manifest), label) for folder, manifest, label in candidates]
        runtime = runtimes[0][0]
        bound = {
            "target": certificate.target if config.target is None else config.target,
            "epsilon": certificate.epsilon if config.epsilon is None else config.epsilon,
            "original_model": dyn.loaded.base_model_info(),
            "provider": runtime.provider,
            "progress": progress,
        }
        sets = (cut(sets_of["calibration"]), cut(sets_of["heldout"]))
        if config.certify_risk == FIDELITY_RISK:
            return certify_package_fidelity(runtimes, dyn.loaded.layered, *sets, certificate.candidates, kl_tau=config.kl_tau, **bound)
        # the free-running consistency in the calibration's measure (top1 has no free-running sense: tokens)
        measure = certificate.measure if certificate.measure != TOP1 else "tokens"
        certified = certify_package(runtime, *sets, certificate.candidates, measure=measure, **bound)
        return certified, 0 if certified.full_depth_certified else None

    return certify
