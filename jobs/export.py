"""`export`: the artifact's dynamic model as an ONNX Runtime package (default `ARTIFACT/onnx/`).

`run` checks every option and the output path before the model loads, then builds, verifies and
swaps in the package (see `exporters.onnx_export`). With `certify` the staged package is certified on its own
continuations before it replaces anything (`certification.package`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from dyninfer.certification.package import certify_package
from dyninfer.core import stages
from dyninfer.core.choices import GENERATION_RISK
from dyninfer.core.errors import DyninferError, option
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.exporters.onnx_export import ExportResult, export_dynamic, preflight
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
    certify = package_certifier(dyn, config.provider, progress, config.target, config.epsilon) if config.certify else None
    return export_dynamic(
        dyn,
        target,
        provider=config.provider,
        dtype=config.dtype,
        baseline=config.baseline,
        verify=config.verify,
        weights=config.weights,
        block_size=config.block_size,
        accuracy_level=config.accuracy_level,
        certify=certify,
        kv_layout=config.kv_layout,
        progress=progress,
    )


def package_certifier(
    dyn: LoadedDynamic, provider: str, progress: ProgressFn | None, target: float | None = None, epsilon: float | None = None
) -> Callable[[Path, PackageManifest], PackageCertificate]:
    """Certification of a package of `dyn` on `provider`, against calibration's cached continuations of the original
    model and along its candidate thresholds, at `target` and `epsilon` (None: calibration's); refused before any
    export work when the artifact cannot support it."""
    calibration = dyn.calibration
    certificate = None if calibration is None else calibration.certificate
    where = dyn.where
    if certificate is None or not certificate.on_generation:
        risk = certificate.risk if certificate is not None else "no"
        raise DyninferError(
            f"{option('certify')} needs a calibration on generations: {where} was calibrated with the "
            f"{risk} risk; run `dyninfer calibrate` into it with the {GENERATION_RISK} risk (its default) first"
        )
    group = dyn.artifact.tensors.get(stages.GENERATION_GROUP, {})
    sets = {what: (group.get(f"{what}.prompts"), group.get(f"{what}.continuations")) for what in ("calibration", "heldout")}
    if any(tensor is None for tensor in sets["calibration"]):
        raise DyninferError(
            f"{where} keeps no calibration continuations; calibrate into it again with the {GENERATION_RISK} risk (the default)"
        )
    if calibration.continuations_key != model_state(dyn.session, dyn.artifact):
        raise DyninferError(
            f"{where} changed since calibration (steering, pruning or tuning): its continuations are not this model's; "
            "run `dyninfer calibrate` into it again"
        )
    new_tokens = certificate.new_tokens or sets["calibration"][1].shape[1]

    def cut(pair):  # the stored continuations may be longer than the calibration's (an earlier, longer run)
        prompts, continuations = pair
        return None if prompts is None or continuations is None else (prompts.numpy(), continuations[:, :new_tokens].numpy())

    def certify(package: Path, manifest: PackageManifest) -> PackageCertificate:
        runtime = OnnxDecoder(package, provider=provider, manifest=manifest)
        return certify_package(
            runtime,
            cut(sets["calibration"]),
            cut(sets["heldout"]),
            certificate.candidates,
            target=certificate.target if target is None else target,
            epsilon=certificate.epsilon if epsilon is None else epsilon,
            measure=certificate.measure,
            original_model=dyn.loaded.base_model_info(),
            provider=runtime.provider,
            progress=progress,
        )

    return certify
