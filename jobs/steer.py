"""`steer extract|sweep|apply`: jobs on an artifact that extract a direction, sweep α over it, apply one α.

The `steer` stage of the manifest holds, per method, how the direction was made (data spec,
seed, split sizes, shots, layers or LoRA settings) so `sweep` rebuilds the same held-out
questions and prompts; the sweeps' summaries; and `applied` ({method, alpha}), which every
loader (run, bench, calibrate, prune, export) bakes into the weights. An activation
direction is also written as a llama.cpp control vector (`control_vector.gguf`). A sweep's
report folder is `steer/sweep-METHOD/` (sweep.json, sweep.png).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from dyninfer.compressors.pruning import remove_pruning
from dyninfer.compressors.steer_extract import (
    CotPrompter,
    activation_direction,
    chain_means,
    default_layers,
    load_cot_split,
    train_valve,
    valve_between,
)
from dyninfer.compressors.steering import LARGEST_SAFE_CHANGE, ActivationSteering, Steering, ValveDelta, applied, safe_change
from dyninfer.core import stages
from dyninfer.core.artifact_paths import artifact_exists
from dyninfer.core.artifacts import Artifact, BaseModelInfo
from dyninfer.core.choices import DEFAULT_MODEL
from dyninfer.core.choices import STEER_METHODS as METHODS
from dyninfer.core.errors import DyninferError, check_choice, option
from dyninfer.core.models import LoadedModel
from dyninfer.core.placement import Placement
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.core.records import SteerRecord
from dyninfer.jobs.configs import ApplyConfig, ExtractConfig, SweepConfig
from dyninfer.jobs.plots import steer_sweep_png
from dyninfer.profilers.steer_sweep import SweepResult, run_sweep
from dyninfer.runtime.loader import ModelSession

GGUF_NAME = "control_vector.gguf"


@dataclass
class ExtractReport:
    artifact: Artifact
    method: str
    record: dict

    def summary(self) -> dict:
        return {"method": self.method, "base_model": self.artifact.base_model.to_dict(), **self.record}


def _open(
    model: str | None, existing: str | Artifact | None, session: ModelSession | None, placement: Placement
) -> tuple[LoadedModel, Artifact]:
    """The base model (tuned when the artifact is; never steered or pruned) and the artifact to extend, or a new one."""
    if isinstance(existing, Artifact) or (existing and artifact_exists(existing)):
        artifact = existing if isinstance(existing, Artifact) else Artifact.load(existing)
        spec = model or artifact.base_model.spec
    else:
        artifact, spec = None, model or DEFAULT_MODEL
    if session is None or session.steering is not None or session.loaded.spec != spec or (artifact is None and session.tuning is not None):
        session = ModelSession.load(spec, placement)
    remove_pruning(session.lm)  # a shared model may carry an artifact's masks
    loaded = session.loaded
    if artifact is None:
        return loaded, Artifact(BaseModelInfo.from_dict(loaded.base_model_info()), tokenizer=loaded.spec)
    artifact.check_base_model(loaded.content_hash, loaded.spec)
    session.bake_tuning(artifact)  # a tuned artifact's directions are made on the tuned model
    return loaded, artifact


def _split(split: dict) -> tuple[list, list]:
    return load_cot_split(split["data"], split["seed"], split["examples"], split["heldout"])


def _prompter(loaded: LoadedModel, split: dict, train: list) -> tuple[CotPrompter, list]:
    """The prompter (its worked examples: the first `shots` training examples) and the training examples left."""
    return CotPrompter(loaded.tokenizer, train[: split["shots"]]), train[split["shots"] :]


def extract(
    config: ExtractConfig, existing: str | Artifact | None = None, progress: ProgressFn | None = None, session: ModelSession | None = None
) -> ExtractReport:
    """Extract one direction from the base model (never a steered one) and store it in the artifact."""
    config.validate()
    report = progress or silent
    train, _ = _split(config.split_record())  # bad data fails before the model loads
    report("loading model", 0, 1)
    loaded, artifact = _open(config.model, existing, session, config.placement())
    lm = loaded.layered
    lm.require_weights("steer extract")
    prompter, train = _prompter(loaded, config.split_record(), train)
    record: dict = {"split": config.split_record(), "placement": loaded.placement}
    if config.method == "activation":
        layers = list(config.layers) if config.layers is not None else default_layers(lm.num_layers)
        bad = [i for i in layers if not 0 <= i < lm.num_layers]
        if bad or not layers:
            raise DyninferError(f"{option('layers')} must name decoder layers 0..{lm.num_layers - 1}, got {layers}")
        means = chain_means(loaded, prompter, train, sorted(set(layers)), config.batch_size, progress=progress)
        direction = activation_direction(means, sorted(set(layers)), config.kind)
        record.update(
            kind=config.kind,
            layers=sorted(direction.directions),
            norms={str(i): float(v.norm()) for i, v in direction.directions.items()},
            hidden_norms={str(i): float(means["long"][:, j].norm(dim=-1).mean()) for j, i in enumerate(sorted(direction.directions))},
        )
    elif config.delta_from is not None:
        direction = valve_between(loaded, config.delta_from, config.delta_to)
        record.update(source="delta", delta_from=config.delta_from, delta_to=config.delta_to)
    else:
        direction, training = train_valve(
            loaded,
            prompter,
            train,
            rank=config.rank,
            steps=config.steps,
            lr=config.lr,
            batch_size=config.batch_size,
            seed=config.seed,
            targets=tuple(config.targets) if config.targets else None,
            progress=progress,
        )
        record.update(source="lora", **training)
    if isinstance(direction, ValveDelta):
        record.update(parameters=len(direction.names()), delta_numel=direction.numel())
    steering = Steering.from_artifact(artifact)
    setattr(steering, config.method, direction)
    artifact.put_tensors(stages.STEERING_GROUP, steering.tensors())
    stage = SteerRecord.read(artifact) or SteerRecord()
    stage.methods[config.method] = record
    stage.sweeps.pop(config.method, None)  # a sweep of the old direction no longer applies
    if isinstance(stage.applied, dict) and stage.applied.get("method") == config.method:
        stage.applied = None  # the applied direction changed: apply it again deliberately
    stage.write(artifact)
    report("done", 1, 1)
    return ExtractReport(artifact, config.method, record)


def save_extract(report: ExtractReport, out: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Path:
    return report.artifact.save(out, on_wait=on_wait)


@dataclass
class SweepReport:
    artifact: Artifact
    result: SweepResult
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {**self.result.to_dict(), "notes": self.notes}

    @property
    def folder(self) -> str:
        """The report folder, relative to the artifact."""
        return f"{stages.STEER}/sweep-{self.result.method}"

    def figure(self) -> bytes:
        return steer_sweep_png(self.summary()["points"], f"{self.artifact.base_model.spec}: {self.result.method} steering")

    def files(self) -> dict[str, bytes]:
        """The steer/sweep-METHOD/ report folder: sweep.json and sweep.png."""
        return {"sweep.json": json.dumps(self.summary(), indent=2, default=str).encode(), "sweep.png": self.figure()}


def _stage_for(artifact: Artifact, method: str, where: str) -> dict:
    check_choice("method", method, METHODS)
    record = _steer_methods(artifact).get(method)
    if record is None:
        raise DyninferError(
            f"{where} holds no {method} direction; extract one into it with `dyninfer steer extract` ({option('method')} {method}) first"
        )
    return record


def _steer_methods(artifact: Artifact) -> dict:
    record = SteerRecord.read(artifact)
    return {} if record is None else record.methods


def pick_method(artifact: Artifact, method: str | None, where: str) -> str:
    """The method named, or the only one the artifact holds."""
    if method is not None:
        return method
    held = sorted(_steer_methods(artifact))
    if len(held) == 1:
        return held[0]
    if not held:
        raise DyninferError(f"{where} holds no steering direction; extract one into it with `dyninfer steer extract` first")
    raise DyninferError(f"{where} holds {' and '.join(held)} directions; pick one with {option('method')}")


def _where(artifact: Artifact) -> str:
    return f"'{artifact.path}'" if artifact.path is not None else "the artifact"


def sweep(
    config: SweepConfig, artifact: str | Artifact, progress: ProgressFn | None = None, session: ModelSession | None = None
) -> SweepReport:
    """Answer held-out questions at each α, from the base model; the sweep's summary goes into the artifact."""
    config.validate()
    artifact = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    where = _where(artifact)
    method = pick_method(artifact, config.method, where)
    record = _stage_for(artifact, method, where)
    split = dict(record["split"])
    if config.questions is not None:
        split["heldout"] = config.questions
    train, heldout = _split(split)
    loaded, _ = _open(config.model, artifact, session, config.placement())
    prompter, _ = _prompter(loaded, split, train)
    direction = Steering.from_artifact(artifact).get(method)
    result = run_sweep(
        loaded,
        direction,
        method,
        prompter,
        heldout,
        list(config.alphas),
        config.max_new_tokens,
        config.batch_size,
        config.keep,
        progress=progress,
    )
    notes = []
    if applied(artifact):
        notes.append("the sweep starts from the base model; the artifact's applied α is not part of it")
    stage = SteerRecord.read(artifact)
    stage.sweeps[method] = result.summary()
    stage.write(artifact)
    return SweepReport(artifact, result, notes)


def save_sweep(report: SweepReport, out: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Path:
    """Save the artifact (the sweep's summary) and its steer/sweep-METHOD/ report folder (the other
    methods' sweep folders stay)."""
    return report.artifact.save(out, reports={report.folder: report.files()}, on_wait=on_wait)


@dataclass
class ApplyReport:
    artifact: Artifact
    method: str
    alpha: float
    gguf: Path | None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "artifact": str(self.artifact.path),
            "method": self.method,
            "alpha": self.alpha,
            "control_vector": str(self.gguf) if self.gguf else None,
            "notes": self.notes,
        }


def write_control_vector(path: Path, steering: ActivationSteering, alpha: float, model_hint: str) -> Path:
    """α·direction as a llama.cpp control vector: arch `controlvector`, one `direction.{layer}` per layer.

    llama.cpp adds `direction.{i}` to the output of decoder layer i (0-based), scaled by the
    strength given at load time; α is folded in, so strength 1 reproduces this model.
    """
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model_hint)
    writer.add_uint32("controlvector.layer_count", len(steering.directions))
    for layer, vector in sorted(steering.directions.items()):
        writer.add_tensor(f"direction.{layer}", (alpha * vector.float()).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def apply(config: ApplyConfig, path: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> ApplyReport:
    """Record α for a method and save the artifact at `path`; loaders bake θ + α·Δθ (or the α-scaled
    biases) into the weights. An activation direction is also written as `control_vector.gguf`."""
    config.validate()
    artifact = Artifact.load(path)
    where = _where(artifact)
    method = pick_method(artifact, config.method, where)
    _stage_for(artifact, method, where)
    direction = Steering.from_artifact(artifact).get(method)
    change = direction.largest_change(float(config.alpha))
    if not safe_change(change):
        raise DyninferError(
            f"α = {config.alpha:g} changes the model by up to {change:.3g}, past what float32 can square ({LARGEST_SAFE_CHANGE:.3g}), "
            "so every output would be NaN; pass a smaller `alpha` (`dyninfer steer sweep` finds one that keeps the answers)"
        )
    stage = SteerRecord.read(artifact)
    stage.applied = {"method": method, "alpha": float(config.alpha)}
    stage.write(artifact)
    notes: list[str] = []
    activation = isinstance(direction, ActivationSteering)

    def control_vector(staged: Path) -> None:  # written inside the staged artifact: saved in the same swap
        write_control_vector(staged / GGUF_NAME, direction, float(config.alpha), artifact.base_model.architecture)

    target = artifact.save(path, build=control_vector if activation else None, on_wait=on_wait)
    gguf_path = target / GGUF_NAME if activation else None
    if activation and 0 in direction.directions:
        notes.append("llama.cpp applies control vectors from layer 1 on: it ignores direction.0")
    if (target / "onnx").is_dir():
        notes.append(f"{target / 'onnx'} was exported before this α; run `dyninfer export` on it again")
    return ApplyReport(artifact, method, float(config.alpha), gguf_path, notes)
