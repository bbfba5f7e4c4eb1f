"""Load what a stage works on: the model with an artifact's decisions applied, and the data.

- `ModelSession`: a loaded model and which of an artifact's changes it carries (the baked
  steering, the installed pruning masks). One session can serve several stages (`audit` loads
  the model once); `apply` brings the model in line with an artifact before each stage.
- `open_workspace`: what `probe`, `calibrate`, `prune` and `profile` start from: the session,
  the artifact being extended (checked against the model) and the data windows. The tuned lens
  is shared: taken from `lens_from`, else from the artifact, else trained on the train split.
- `load_dynamic` / `build_dynamic`: the dynamic model an artifact describes (run, bench, export).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dyninfer.compressors.exit_tuning import bake_tuning, fingerprint, stored_draft_vocabulary, stored_tuning
from dyninfer.compressors.pruning import PruningPlan, load_pruning, remove_pruning
from dyninfer.compressors.steering import ValveDelta, applied, load_steering
from dyninfer.compressors.stop_obey import ProbeVocabulary, Stopper, stopper_for
from dyninfer.core import stages
from dyninfer.core.artifact_paths import artifact_exists
from dyninfer.core.artifacts import Artifact, BaseModelInfo
from dyninfer.core.choices import COMPLETION, KV_MODES, TUNED
from dyninfer.core.data import TokenWindows, load_windows
from dyninfer.core.errors import DyninferError, check_choice, option
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import LogitLens, TunedLens, TunedLensTraining, train_tuned_lens
from dyninfer.core.models import LoadedModel, load_model, load_tokenizer
from dyninfer.core.placement import CPU_FLOAT32, Placement
from dyninfer.core.policies import ExitPolicy, StopPolicy
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.core.records import CalibrateRecord, LensRecord, PruneRecord, StopRecord, TrainedWindows
from dyninfer.early_exit.confidence import ExitClassifier
from dyninfer.runtime.dynamic import DynamicModel


@dataclass
class ModelSession:
    """A loaded model and the artifact changes applied to it."""

    loaded: LoadedModel
    steering: dict | None = None  # the applied steering baked into the weights ({method, alpha})
    tuning: str | None = None  # the fingerprint of the tune-exits LoRA baked into the weights
    tuned_by: ValveDelta | None = None  # that LoRA
    _windows: dict = field(default_factory=dict, repr=False)  # (data, field, seq_len, seed) -> TokenWindows

    @classmethod
    def load(cls, spec: str, placement: Placement = CPU_FLOAT32) -> ModelSession:
        return cls(load_model(spec, placement))

    @property
    def lm(self) -> LayeredModel:
        return self.loaded.layered

    def apply(self, artifact: Artifact, pruning: bool = True) -> PruningPlan | None:
        """Make the model the one `artifact` describes: its applied steering baked in and its pruning
        masks installed (taken out when `pruning` is False). Returns the installed plan."""
        artifact.check_base_model(self.loaded.content_hash, self.loaded.spec)
        remove_pruning(self.lm)  # before steering: SparseMLP copies the (steered) MLP weights
        self.bake_tuning(artifact)
        record = applied(artifact)
        if record is not None or (pruning and stages.PRUNE in artifact.stages):
            self.lm.require_weights("the artifact's steering or pruning masks")
        if record != self.steering:
            if self.steering is not None:
                raise DyninferError("this loaded model already has another steering baked in; load the model again for this artifact")
            load_steering(artifact, self.lm)
            self.steering = record
        return load_pruning(artifact, self.lm) if pruning else None

    def bake_tuning(self, artifact: Artifact) -> None:
        """Bake the artifact's tune-exits LoRA into the weights, first of all its changes (the others were made
        on the tuned model)."""
        delta = stored_tuning(artifact)
        wanted = fingerprint(delta) if delta is not None else None
        if wanted == self.tuning:
            return
        if self.tuning is not None or self.steering is not None:
            raise DyninferError("this loaded model already has another tuning or steering baked in; load the model again for this artifact")
        self.lm.require_weights("the artifact's tune-exits LoRA")
        bake_tuning(self.lm, delta)
        self.tuning, self.tuned_by = wanted, delta

    def windows(
        self, data: str, field: str | None, seq_len: int, seed: int, made: TokenWindows | None = None, length_options=("seq_len",)
    ) -> TokenWindows:
        """The data's token windows, tokenised once per session (stages of an audit share them); `made`: the same
        windows, cut with this model's tokenizer before the model loaded. `length_options`: the options that set
        `seq_len` (named when it is too long)."""
        key = (data, field, seq_len, seed)
        if made is not None:
            self._windows.setdefault(key, made)
        context = self.lm.context_length
        if context is not None and seq_len > context:
            named = " + ".join(option(name) for name in length_options)
            raise DyninferError(f"{named} = {seq_len} tokens is beyond the model's {context} positions; lower it to {context} or less")
        if key not in self._windows:
            self._windows[key] = load_windows(data, self.loaded.tokenizer, field=field, seq_len=seq_len, seed=seed)
        return self._windows[key]


@dataclass
class Workspace:
    session: ModelSession
    windows: TokenWindows
    artifact: Artifact
    extends_existing: bool
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def loaded(self) -> LoadedModel:
        return self.session.loaded

    @property
    def lm(self) -> LayeredModel:
        return self.session.lm

    def stored_tuned_lens(self) -> TunedLens | None:
        return TunedLens.from_tensors(self.lm, self.artifact.tensors[stages.EXITS_GROUP]) if has_tuned_lens(self.artifact) else None

    def tuned_lens(
        self,
        *,
        lens_from: str | None = None,
        train_tokens: int = 16384,
        steps: int = 60,
        seed: int = 0,
        retrain: bool = False,
        progress: ProgressFn | None = None,
    ) -> tuple[TunedLens, TunedLensTraining | None]:
        """The tuned lens to use, and its training record when it was trained now."""
        started = time.perf_counter()
        try:
            if lens_from:
                source = Artifact.load(lens_from, expect_model_hash=self.loaded.content_hash)
                lens = TunedLens.from_tensors(self.lm, source.tensors.get(stages.EXITS_GROUP, {}))
                self._store(lens, _lens_windows(source))  # the artifact must stand alone
                return lens, None
            stored = None if retrain else self.stored_tuned_lens()
            if stored is not None:
                return stored, None
            rows = self.windows.take_rows("train", train_tokens, option="lens_train_tokens")
            lens, record = train_tuned_lens(self.lm, self.windows.train[rows], steps=steps, seed=seed, progress=progress)
            self._store(lens, lens_provenance(self.windows, rows))
            return lens, record
        finally:
            self.timings["tuned_lens_s"] = time.perf_counter() - started

    def lens_windows(self) -> TrainedWindows | None:
        """Where the artifact's tuned lens was trained (`lens_provenance`), or None when unknown."""
        return _lens_windows(self.artifact)

    def _store(self, lens: TunedLens, provenance: TrainedWindows | None) -> None:
        """Put the lens in the artifact's exits group, keeping whatever else the group holds, and where it trained."""
        exits = dict(self.artifact.tensors.get(stages.EXITS_GROUP, {}))
        exits.update(lens.tensors())
        self.artifact.put_tensors(stages.EXITS_GROUP, exits)
        if provenance is None:
            LensRecord.clear(self.artifact)
        else:
            LensRecord(data=provenance.data, window_len=provenance.window_len, windows=provenance.windows).write(self.artifact)


def _lens_windows(artifact: Artifact) -> TrainedWindows | None:
    record = LensRecord.read(artifact)
    return None if record is None else record.provenance()


def lens_provenance(windows: TokenWindows, rows) -> TrainedWindows:
    """The corpus windows a lens (or a tuning) trained on: `rows` of the train split."""
    return TrainedWindows(windows.spec, windows.stride, [int(i) for i in windows.index("train")[rows]])


def trained_on(provenance: TrainedWindows | None, windows: TokenWindows, split: str, rows) -> int | None:
    """How many of `rows` of `split` share corpus tokens with the windows `provenance` records.

    None when that cannot be known: no record, or a lens trained on another corpus.
    """
    overlaps = lens_overlaps(provenance, windows, split, rows)
    return None if overlaps is None else sum(overlaps)


def lens_overlaps(provenance: TrainedWindows | None, windows: TokenWindows, split: str, rows) -> list[bool] | None:
    """Per row of `rows` of `split`: does it share corpus tokens with the lens's windows (None: unknown)."""
    if provenance is None or provenance.data != windows.spec:
        return None
    length = provenance.window_len
    seen = sorted((i * length, (i + 1) * length) for i in provenance.windows)
    starts = [a for a, _ in seen]
    here = windows.stride
    overlaps = []
    for k in windows.index(split)[rows].tolist():
        lo, hi = k * here, (k + 1) * here
        j = bisect.bisect_right(starts, hi - 1) - 1  # the last lens window starting before this one ends
        overlaps.append(j >= 0 and seen[j][1] > lo)
    return overlaps


def load_checked(
    model: str,
    placement: Placement,
    data: tuple[str, str | None, int, int],
    check: Callable[[TokenWindows], None] | None,
    progress: ProgressFn | None = None,
) -> tuple[ModelSession, TokenWindows | None]:
    """Load the model; `check` first refuses data (spec, field, seq_len, seed) too short for the command's work, with
    the windows cut by the tokenizer read alone, before the weights load. Returns the session and those windows (None
    where the tokenizer cannot be read alone, `load_tokenizer`: check the session's windows then)."""
    report = progress or silent
    tokenizer = load_tokenizer(model) if check is not None else None
    early = None
    if tokenizer is not None:
        spec, field, seq_len, seed = data
        early = load_windows(spec, tokenizer, field=field, seq_len=seq_len, seed=seed)
        check(early)
    report("loading model", 0, 1)
    session = ModelSession.load(model, placement)
    report("loading model", 1, 1)
    return session, early


def model_state(session: ModelSession, artifact: Artifact) -> str:
    """What the model's generations depend on: the weights, the tuning and steering baked in, the pruning masks."""
    state = {
        "model": session.loaded.content_hash,
        "tuning": session.tuning,
        "steering": session.steering,
        "pruning": None if (pruned := PruneRecord.read(artifact)) is None else pruned.plan,
    }
    if state["tuning"] is None:  # keys made before tunings were part of them stay valid
        del state["tuning"]
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:16]


def lens_to_train(artifact: Artifact | None, lens_from: str | None, retrain: bool = False) -> bool:
    """Whether asking for the tuned lens trains one now (none stored in the artifact, none given, or a retrain)."""
    if lens_from:
        return False
    return retrain or artifact is None or not has_tuned_lens(artifact)


def has_tuned_lens(artifact: Artifact) -> bool:
    return "tuned_lens.weight" in artifact.tensors.get(stages.EXITS_GROUP, {})


def open_workspace(
    model: str,
    data: str,
    *,
    field: str | None = None,
    seq_len: int = 256,
    seed: int = 0,
    existing: str | Artifact | None = None,
    progress: ProgressFn | None = None,
    apply_pruning: bool = True,
    session: ModelSession | None = None,
    placement: Placement = CPU_FLOAT32,
    check_data: Callable[[TokenWindows, Artifact | None], None] | None = None,
    length_options: tuple[str, ...] = ("seq_len",),
) -> Workspace:
    """Load the model (unless `session` holds it), then the artifact to extend, then the data.

    `check_data(windows, stored artifact or None)` refuses data too short for the command's work: called with
    windows cut by the tokenizer alone before the weights load where the tokenizer can be read alone, else
    once the data is loaded.

    `existing`: an artifact directory, or an artifact already in memory (`audit` chains its
    stages this way and saves once at the end).

    The artifact's applied steering is baked in, and its pruning masks, if any, are installed
    (later stages work on the steered, pruned model) unless `apply_pruning` is False (`prune`
    itself starts from the dense model).
    """
    timings: dict[str, float] = {}
    extends = isinstance(existing, Artifact) or (bool(existing) and artifact_exists(existing))
    stored = (existing if isinstance(existing, Artifact) else Artifact.load(existing)) if extends else None
    started = time.perf_counter()
    early = None
    if session is None:
        check = (lambda windows: check_data(windows, stored)) if check_data is not None else None
        session, early = load_checked(model, placement, (data, field, seq_len, seed), check, progress)
    elif model != session.loaded.spec:
        raise DyninferError(f"the loaded model is '{session.loaded.spec}', not '{model}'")
    timings["load_model_s"] = time.perf_counter() - started
    artifact = stored if stored is not None else Artifact(BaseModelInfo.from_dict(session.loaded.base_model_info()), tokenizer=model)
    session.apply(artifact, pruning=apply_pruning)
    started = time.perf_counter()
    windows = session.windows(data, field, seq_len, seed, made=early, length_options=length_options)
    timings["load_data_s"] = time.perf_counter() - started
    if check_data is not None and early is None:
        check_data(windows, stored)
    return Workspace(session, windows, artifact, extends, timings)


class WorkspaceOptions(Protocol):
    """The fields every stage's Config shares (jobs/configs/): what to load, which data, and where to run."""

    model: str
    field: str | None
    seed: int

    def placement(self) -> Placement: ...


def workspace_for(
    config: WorkspaceOptions,
    data: str,
    seq_len: int,
    *,
    existing: str | Artifact | None = None,
    progress: ProgressFn | None = None,
    session: ModelSession | None = None,
    **options,
) -> Workspace:
    """`open_workspace` with a Config's shared fields (the model, the data's field, the seed, the placement); `options`:
    `open_workspace`'s others (`check_data`, `apply_pruning`, `length_options`)."""
    return open_workspace(
        config.model,
        data,
        field=config.field,
        seq_len=seq_len,
        seed=config.seed,
        existing=existing,
        progress=progress,
        session=session,
        placement=config.placement(),
        **options,
    )


@dataclass
class LoadedDynamic:
    artifact: Artifact
    loaded: LoadedModel
    dynamic: DynamicModel
    policy: ExitPolicy | None
    pruning: PruningPlan | None = None  # installed on the model's MLPs
    steering: dict | None = None  # the applied steering ({method, alpha}), baked into the weights
    tuning: ValveDelta | None = None  # the tune-exits LoRA, baked into the weights
    session: ModelSession | None = None

    @property
    def calibration(self) -> CalibrateRecord | None:
        """The artifact's calibration (None: never calibrated)."""
        return CalibrateRecord.read(self.artifact)

    @property
    def where(self) -> str:
        """The artifact, as messages name it."""
        return f"'{self.artifact.path}'" if self.artifact.path is not None else "the artifact"

    @property
    def notes(self) -> list[str]:
        """What a report on this dynamic model should say: a calibration certified in another dtype."""
        record = self.calibration
        return placement_notes(record.dtype if record else None, self.loaded.placement, stages.CALIBRATE)


def stored_stop_policy(dyn: LoadedDynamic, workload: str) -> StopPolicy:
    """The artifact's certified stop rule for `workload`, refused when it was certified on another model state
    (steering, pruning or tuning changed since) or the record is damaged."""
    record = StopRecord.read(dyn.artifact)
    where = dyn.where
    rule = None if record is None else record.rules.get(workload)
    if rule is None:
        raise DyninferError(f"{where} has no {workload} stop rule; run `dyninfer stop` with {option('workload')} {workload} into it first")
    policy = rule.policy
    if policy.model_state != model_state(dyn.session, dyn.artifact):
        raise DyninferError(
            f"{where}'s {workload} stop rule was certified on another model (its steering, pruning or tuning has changed "
            f"since, or another model was loaded); run `dyninfer stop` with {option('workload')} {workload} into it again"
        )
    return policy


def stored_stopper(dyn: LoadedDynamic, policy: StopPolicy) -> Stopper:
    """A fresh stopper for one generation of `dyn` (a stopper keeps per-generation state)."""
    vocabulary = None if policy.workload == COMPLETION else probe_vocabulary(dyn.loaded.tokenizer, policy.probe_suffix)
    return stopper_for(policy, vocabulary)


@functools.lru_cache(maxsize=4)
def probe_vocabulary(tokenizer, suffix: str) -> ProbeVocabulary:
    return ProbeVocabulary.from_tokenizer(tokenizer, suffix)


def placement_notes(then: str | None, placement: dict, stage: str) -> list[str]:
    """A note when the stage ran in another dtype (`then`; None: unknown or never ran) than `placement`'s."""
    if then is None or then == placement["dtype"]:
        return []
    return [
        f"the artifact's {stage} stage ran in {then} and this run is in {placement['dtype']}: its numbers hold "
        f"for {then}; run `dyninfer {stage}` in {placement['dtype']} to have them for this precision"
    ]


def load_dynamic(
    path: str,
    model: str | None = None,
    require_policy: bool = True,
    kv_mode: str | None = None,
    full_depth_is_enough: bool = False,
    placement: Placement = CPU_FLOAT32,
) -> LoadedDynamic:
    """Load the artifact at `path` and its base model (or `model`, which must be the same weights)."""
    placement.validate()  # before the artifact: a bad option is reported as such, whatever the path
    artifact = Artifact.load(path)
    session = ModelSession.load(model or artifact.base_model.spec, placement)
    return build_dynamic(artifact, session, require_policy=require_policy, kv_mode=kv_mode, full_depth_is_enough=full_depth_is_enough)


def build_dynamic(
    artifact: Artifact,
    session: ModelSession,
    *,
    require_policy: bool = True,
    kv_mode: str | None = None,
    full_depth_is_enough: bool = False,
) -> LoadedDynamic:
    """The dynamic model `artifact` describes, on the session's model.

    `kv_mode` overrides the policy's way of filling skipped layers' caches. The artifact's
    applied steering is baked into the weights, then its pruning masks, if any, are installed.
    `full_depth_is_enough`: a pruned or steered artifact without a policy satisfies
    `require_policy` (bench compares it at full depth).
    """
    pruning = session.apply(artifact)
    where = f"'{artifact.path}'" if artifact.path is not None else "the artifact"
    stage = CalibrateRecord.read(artifact)
    compressed = PruneRecord.read(artifact) is not None or applied(artifact) is not None
    if stage is None and require_policy and not (full_depth_is_enough and compressed):
        raise DyninferError(f"{where} has no early-exit policy; run `dyninfer calibrate` into it first")
    if stage is not None and stage.policy is None:
        raise DyninferError(f"{where} has a calibrate stage without a policy; run `dyninfer calibrate` into it again")
    policy = dataclasses.replace(stage.policy).check_points(session.lm.num_layers) if stage else None
    if kv_mode is not None:
        check_choice("kv_mode", kv_mode, KV_MODES)
        if policy is not None:
            policy.kv_mode = kv_mode
    exits = artifact.tensors.get(stages.EXITS_GROUP, {})
    lm = session.lm
    lens = TunedLens.from_tensors(lm, exits) if policy is not None and policy.lens == TUNED else LogitLens(lm)
    classifier = None
    if policy is not None and policy.measure == "classifier":
        classifier = ExitClassifier.from_tensors(exits, len(policy.exit_points), lm.hidden_size).to(lm.device)
    dynamic = DynamicModel(lm, policy, lens, classifier, draft_vocabulary=stored_draft_vocabulary(artifact))
    return LoadedDynamic(artifact, session.loaded, dynamic, policy, pruning, session.steering, session.tuned_by, session)
