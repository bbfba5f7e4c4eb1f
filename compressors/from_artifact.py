"""Rebuild the dynamic model an artifact describes: base model, exit head, policy, classifier."""

from __future__ import annotations

from dataclasses import dataclass

from dyninfer.artifacts import Artifact
from dyninfer.compressors.calibrate import ExitPolicy
from dyninfer.compressors.calibration_job import CALIBRATE_STAGE, KV_MODES
from dyninfer.compressors.confidence import ExitClassifier
from dyninfer.compressors.dynamic import DynamicModel
from dyninfer.compressors.pruning import PRUNE_STAGE, PruningPlan, load_pruning
from dyninfer.compressors.steering import applied, load_steering
from dyninfer.errors import DyninferError
from dyninfer.models import LoadedModel, load_model
from dyninfer.profilers.lenses import TUNED, TUNED_LENS_GROUP, LogitLens, TunedLens


@dataclass
class LoadedDynamic:
    artifact: Artifact
    loaded: LoadedModel
    dynamic: DynamicModel
    policy: ExitPolicy | None
    pruning: PruningPlan | None = None  # installed on the model's MLPs
    steering: dict | None = None  # the applied steering ({method, alpha}), baked into the weights

    @property
    def calibration(self) -> dict:
        return self.artifact.stages.get(CALIBRATE_STAGE, {})


def load_dynamic(path: str, model: str | None = None, require_policy: bool = True,
                 kv_mode: str | None = None, full_depth_is_enough: bool = False) -> LoadedDynamic:
    """Load the artifact at `path` and its base model (or `model`, which must be the same weights).

    `kv_mode` overrides the policy's way of filling skipped layers' caches. The artifact's
    applied steering is baked into the weights, then its pruning masks, if any, are installed.
    `full_depth_is_enough`: a pruned or steered artifact without a policy satisfies
    `require_policy` (bench compares it at full depth).
    """
    artifact = Artifact.load(path)
    loaded = load_model(model or artifact.base_model.spec)
    artifact.check_base_model(loaded.content_hash, loaded.spec)
    stage = artifact.stages.get(CALIBRATE_STAGE)
    compressed = PRUNE_STAGE in artifact.stages or applied(artifact) is not None
    if stage is None and require_policy and not (full_depth_is_enough and compressed):
        raise DyninferError(f"'{path}' has no early-exit policy; run `dyninfer calibrate --out {path}` first")
    policy = ExitPolicy.from_dict(stage["policy"]) if stage else None
    if kv_mode is not None:
        if kv_mode not in KV_MODES:
            raise DyninferError(f"--kv-mode must be one of {', '.join(KV_MODES)}, got '{kv_mode}'")
        if policy is not None:
            policy.kv_mode = kv_mode
    exits = artifact.tensors.get(TUNED_LENS_GROUP, {})
    lm = loaded.layered
    steering = load_steering(artifact, lm)  # before the masks: SparseMLP copies the (steered) MLP weights
    pruning = load_pruning(artifact, lm)
    lens = TunedLens.from_tensors(lm, exits) if policy is not None and policy.lens == TUNED else LogitLens(lm)
    classifier = ExitClassifier.from_tensors(exits) if policy is not None and policy.measure == "classifier" else None
    return LoadedDynamic(artifact, loaded, DynamicModel(lm, policy, lens, classifier), policy, pruning,
                         steering)
