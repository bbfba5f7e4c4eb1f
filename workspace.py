"""What every stage starts from: the model, the data windows and the artifact being extended.

`probe`, `calibrate` and later stages open a `Workspace`, do their work, record a stage in
`workspace.artifact` and save it. The tuned lens is shared: taken from `--lens-from`, else
from the artifact being extended, else trained on the train split.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dyninfer.artifacts import Artifact, BaseModelInfo, artifact_exists
from dyninfer.data import TokenWindows, load_windows
from dyninfer.models import LoadedModel, load_model
from dyninfer.profilers.lenses import TUNED_LENS_GROUP, TunedLens, TunedLensTraining, train_tuned_lens

ProgressFn = Callable[[str, int, int], None]


@dataclass
class Workspace:
    loaded: LoadedModel
    windows: TokenWindows
    artifact: Artifact
    extends_existing: bool
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def lm(self):
        return self.loaded.layered

    def stored_tuned_lens(self) -> TunedLens | None:
        tensors = self.artifact.tensors.get(TUNED_LENS_GROUP, {})
        return TunedLens.from_tensors(self.lm, tensors) if "tuned_lens.weight" in tensors else None

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
                lens = TunedLens.from_tensors(self.lm, source.tensors.get(TUNED_LENS_GROUP, {}))
                self._store(lens)  # the artifact must stand alone: later stages load the lens from it
                return lens, None
            stored = None if retrain else self.stored_tuned_lens()
            if stored is not None:
                return stored, None
            train = self.windows.take("train", train_tokens, option="--lens-train-tokens")
            lens, record = train_tuned_lens(self.lm, train, steps=steps, seed=seed, progress=progress)
            self._store(lens)
            return lens, record
        finally:
            self.timings["tuned_lens_s"] = time.perf_counter() - started

    def _store(self, lens: TunedLens) -> None:
        """Put the lens in the artifact's exits group, keeping whatever else the group holds."""
        exits = dict(self.artifact.tensors.get(TUNED_LENS_GROUP, {}))
        exits.update(lens.tensors())
        self.artifact.put_tensors(TUNED_LENS_GROUP, exits)


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
) -> Workspace:
    """Load the model, then the artifact to extend (checked against the model), then the data.

    `existing`: an artifact directory, or an artifact already in memory (`audit` chains its
    stages this way and saves once at the end).

    The artifact's applied steering is baked in, and its pruning masks, if any, are installed
    (later stages work on the steered, pruned model) unless `apply_pruning` is False (`prune`
    itself starts from the dense model).
    """
    report = progress or (lambda *a: None)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    report("loading model", 0, 1)
    loaded = load_model(model)
    report("loading model", 1, 1)
    timings["load_model_s"] = time.perf_counter() - started
    extends = isinstance(existing, Artifact) or (bool(existing) and artifact_exists(existing))
    if extends:
        if isinstance(existing, Artifact):
            artifact = existing
            artifact.check_base_model(loaded.content_hash, model)
        else:
            artifact = Artifact.load(existing, expect_model_hash=loaded.content_hash)
        from dyninfer.compressors.steering import load_steering

        load_steering(artifact, loaded.layered)  # before the masks: SparseMLP copies the (steered) MLP weights
        if apply_pruning:
            from dyninfer.compressors.pruning import load_pruning

            load_pruning(artifact, loaded.layered)
    else:
        artifact = Artifact(BaseModelInfo.from_dict(loaded.base_model_info()), tokenizer=model)
    started = time.perf_counter()
    windows = load_windows(data, loaded.tokenizer, field=field, seq_len=seq_len, seed=seed)
    timings["load_data_s"] = time.perf_counter() - started
    return Workspace(loaded, windows, artifact, extends, timings)
