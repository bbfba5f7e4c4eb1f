"""`steer` as jobs on an artifact: extract a direction, sweep α over it, apply one α.

The `steer` stage of the manifest holds, per method, how the direction was made (data spec,
seed, split sizes, shots, layers or LoRA settings) so `sweep` rebuilds the same held-out
questions and prompts; the sweeps' summaries; and `applied` ({method, alpha}), which every
loader (run, bench, calibrate, prune, export) bakes into the weights. An activation
direction is also written as a llama.cpp control vector (`control_vector.gguf`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path


from dyninfer.artifacts import Artifact, BaseModelInfo, artifact_exists
from dyninfer.compressors.steer_extract import (BUILTIN_COT, KINDS, CotPrompter, ProgressFn, activation_direction,
                                                chain_means, default_layers, load_cot_split, train_valve,
                                                valve_between)
from dyninfer.compressors.steering import (METHODS, STEER_STAGE, STEERING_GROUP, ActivationSteering, Steering,
                                           ValveDelta, applied)
from dyninfer.errors import DyninferError
from dyninfer.models import DEFAULT_MODEL, LoadedModel, load_model

GGUF_NAME = "control_vector.gguf"


@dataclass
class ExtractConfig:
    model: str = DEFAULT_MODEL
    method: str = "activation"
    data: str = BUILTIN_COT
    examples: int = 128  # training examples (the first `shots` of them become the prompt's worked examples)
    heldout: int = 32
    seed: int = 0
    shots: int = 0
    layers: list[int] | None = None
    kind: str = "mean"
    rank: int = 8
    steps: int = 150
    lr: float = 2e-3
    batch_size: int = 4
    targets: list[str] | None = None
    delta_from: str | None = None
    delta_to: str | None = None

    def validate(self) -> None:
        if self.method not in METHODS:
            raise DyninferError(f"--method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.kind not in KINDS:
            raise DyninferError(f"--kind must be one of {', '.join(KINDS)}, got '{self.kind}'")
        for name, value, low in (("--examples", self.examples, 2), ("--heldout", self.heldout, 1),
                                 ("--rank", self.rank, 1), ("--steps", self.steps, 1),
                                 ("--batch-size", self.batch_size, 1), ("--shots", self.shots, 0)):
            if value < low:
                raise DyninferError(f"{name} must be at least {low}, got {value}")
        if self.shots >= self.examples:
            raise DyninferError(f"--shots ({self.shots}) must be smaller than --examples ({self.examples})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise DyninferError(f"--lr must be a positive number, got {self.lr}")
        if (self.delta_from is None) != (self.delta_to is None):
            raise DyninferError("--delta-from and --delta-to go together (either may be `base`)")
        if self.delta_from is not None and self.method != "valve":
            raise DyninferError("--delta-from/--delta-to make a CoT-Valve direction: add --method valve")

    def split_record(self) -> dict:
        return {"data": self.data, "seed": self.seed, "examples": self.examples, "heldout": self.heldout,
                "shots": self.shots}


@dataclass
class ExtractReport:
    artifact: Artifact
    method: str
    record: dict

    def summary(self) -> dict:
        return {"method": self.method, "base_model": self.artifact.base_model.to_dict(), **self.record}


def _open(model: str | None, existing: str | Artifact | None) -> tuple[LoadedModel, Artifact]:
    if isinstance(existing, Artifact) or (existing and artifact_exists(existing)):
        artifact = existing if isinstance(existing, Artifact) else Artifact.load(existing)
        loaded = load_model(model or artifact.base_model.spec)
        artifact.check_base_model(loaded.content_hash, loaded.spec)
        return loaded, artifact
    loaded = load_model(model or DEFAULT_MODEL)
    return loaded, Artifact(BaseModelInfo.from_dict(loaded.base_model_info()), tokenizer=loaded.spec)


def _split(split: dict) -> tuple[list, list]:
    return load_cot_split(split["data"], split["seed"], split["examples"], split["heldout"])


def _prompter(loaded: LoadedModel, split: dict, train: list) -> tuple[CotPrompter, list]:
    """The prompter (its worked examples: the first `shots` training examples) and the training examples left."""
    return CotPrompter(loaded.tokenizer, train[: split["shots"]]), train[split["shots"]:]


def run_extract(config: ExtractConfig, existing: str | Artifact | None = None,
                progress: ProgressFn | None = None) -> ExtractReport:
    """Extract one direction from the base model (never a steered one) and store it in the artifact."""
    config.validate()
    report = progress or (lambda *a: None)
    train, _ = _split(config.split_record())  # bad data fails before the model loads
    report("loading model", 0, 1)
    loaded, artifact = _open(config.model, existing)
    lm = loaded.layered
    prompter, train = _prompter(loaded, config.split_record(), train)
    record: dict = {"split": config.split_record()}
    if config.method == "activation":
        layers = config.layers if config.layers is not None else default_layers(lm.num_layers)
        bad = [i for i in layers if not 0 <= i < lm.num_layers]
        if bad or not layers:
            raise DyninferError(f"--layers must name decoder layers 0..{lm.num_layers - 1}, got {layers}")
        means = chain_means(loaded, prompter, train, sorted(set(layers)), config.batch_size, progress=progress)
        direction = activation_direction(means, sorted(set(layers)), config.kind)
        record.update(kind=config.kind, layers=sorted(direction.directions),
                      norms={str(i): float(v.norm()) for i, v in direction.directions.items()},
                      hidden_norms={str(i): float(means["long"][:, j].norm(dim=-1).mean())
                                    for j, i in enumerate(sorted(direction.directions))})
    elif config.delta_from is not None:
        direction = valve_between(loaded, config.delta_from, config.delta_to)
        record.update(source="delta", delta_from=config.delta_from, delta_to=config.delta_to)
    else:
        direction, training = train_valve(loaded, prompter, train, rank=config.rank, steps=config.steps, lr=config.lr,
                                          batch_size=config.batch_size, seed=config.seed,
                                          targets=tuple(config.targets) if config.targets else None, progress=progress)
        record.update(source="lora", **training)
    if isinstance(direction, ValveDelta):
        record.update(parameters=len(direction.names()), delta_numel=direction.numel())
    steering = Steering.from_artifact(artifact)
    setattr(steering, config.method, direction)
    artifact.put_tensors(STEERING_GROUP, steering.tensors())
    stage = dict(artifact.stages.get(STEER_STAGE, {}))
    stage.setdefault("methods", {})[config.method] = record
    stage.get("sweeps", {}).pop(config.method, None)  # a sweep of the old direction no longer applies
    if (stage.get("applied") or {}).get("method") == config.method:
        stage["applied"] = None  # the applied direction changed: apply it again deliberately
    artifact.set_stage(STEER_STAGE, stage)
    report("done", 1, 1)
    return ExtractReport(artifact, config.method, record)


@dataclass
class SweepJob:
    artifact: Artifact
    result: object  # profilers.steer_sweep.SweepResult
    notes: list[str] = field(default_factory=list)


def _stage_for(artifact: Artifact, method: str, path: str) -> dict:
    if method not in METHODS:
        raise DyninferError(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    record = (artifact.stages.get(STEER_STAGE) or {}).get("methods", {}).get(method)
    if record is None:
        raise DyninferError(f"'{path}' holds no {method} direction; run `dyninfer steer extract --method {method} "
                            f"--out {path}` first")
    return record


def pick_method(artifact: Artifact, method: str | None, path: str) -> str:
    """The method named, or the only one the artifact holds."""
    if method is not None:
        return method
    held = sorted((artifact.stages.get(STEER_STAGE) or {}).get("methods", {}))
    if len(held) == 1:
        return held[0]
    if not held:
        raise DyninferError(f"'{path}' holds no steering direction; run `dyninfer steer extract --out {path}` first")
    raise DyninferError(f"'{path}' holds {' and '.join(held)} directions; pick one with --method")


def run_sweep_job(path: str | Artifact, method: str | None, alphas: list[float], *, questions: int | None = None,
                  max_new_tokens: int = 128, batch_size: int = 16, keep: float = 0.9, model: str | None = None,
                  progress: ProgressFn | None = None) -> SweepJob:
    from dyninfer.profilers.steer_sweep import run_sweep

    if max_new_tokens < 1:
        raise DyninferError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not 0.0 < keep <= 1.0:
        raise DyninferError(f"--keep must be in (0, 1], got {keep}")
    if any(not math.isfinite(a) for a in alphas):
        raise DyninferError("--alphas must be finite numbers")
    if questions is not None and questions < 1:
        raise DyninferError(f"--questions must be at least 1, got {questions}")
    artifact = path if isinstance(path, Artifact) else Artifact.load(path)
    path = str(artifact.path or "the artifact")
    method = pick_method(artifact, method, path)
    record = _stage_for(artifact, method, path)
    split = dict(record["split"])
    if questions is not None:
        split["heldout"] = questions
    train, heldout = _split(split)
    loaded = load_model(model or artifact.base_model.spec)
    artifact.check_base_model(loaded.content_hash, loaded.spec)
    prompter, _ = _prompter(loaded, split, train)
    direction = Steering.from_artifact(artifact).get(method)
    result = run_sweep(loaded, direction, method, prompter, heldout, alphas, max_new_tokens, batch_size, keep,
                       progress=progress)
    notes = []
    if applied(artifact):
        notes.append("the sweep starts from the base model; the artifact's applied α is not part of it")
    stage = dict(artifact.stages[STEER_STAGE])
    stage.setdefault("sweeps", {})[method] = result.summary()
    artifact.set_stage(STEER_STAGE, stage)
    return SweepJob(artifact, result, notes)


@dataclass
class ApplyResult:
    artifact: Artifact
    method: str
    alpha: float
    gguf: Path | None
    notes: list[str] = field(default_factory=list)


def write_control_vector(path: Path, steering: ActivationSteering, alpha: float, model_hint: str) -> Path:
    """α·direction as a llama.cpp control vector: arch `controlvector`, one `direction.{layer}` per layer.

    llama.cpp adds `direction.{i}` to the output of decoder layer i (0-based), scaled by the
    strength given at load time; α is folded in, so strength 1 reproduces this model.
    """
    import gguf

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", model_hint)
        writer.add_uint32("controlvector.layer_count", len(steering.directions))
        for layer, vector in sorted(steering.directions.items()):
            writer.add_tensor(f"direction.{layer}", (alpha * vector.float()).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def run_apply(path: str, method: str | None, alpha: float) -> ApplyResult:
    """Record α for a method and save; loaders bake θ + α·Δθ (or the α-scaled biases) into the weights.

    An activation direction is also written as `control_vector.gguf` in the artifact directory.
    """
    if not math.isfinite(alpha):
        raise DyninferError(f"--alpha must be a finite number, got {alpha}")
    artifact = Artifact.load(path)
    method = pick_method(artifact, method, path)
    _stage_for(artifact, method, path)
    direction = Steering.from_artifact(artifact).get(method)
    stage = dict(artifact.stages[STEER_STAGE])
    stage["applied"] = {"method": method, "alpha": float(alpha)}
    artifact.set_stage(STEER_STAGE, stage)
    target = artifact.save(path)
    gguf_path, notes = None, []
    if isinstance(direction, ActivationSteering):
        gguf_path = write_control_vector(target / GGUF_NAME, direction, float(alpha), artifact.base_model.architecture)
        if 0 in direction.directions:
            notes.append("llama.cpp applies control vectors from layer 1 on: it ignores direction.0")
    if (target / "onnx").is_dir():
        notes.append(f"{target / 'onnx'} was exported before this α; run `dyninfer export {path}` again")
    return ApplyResult(artifact, method, float(alpha), gguf_path, notes)
