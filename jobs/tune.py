"""`tune-exits`: workspace -> held-out exits of the original model -> LoRA fine-tune -> the same measured again.

The LoRA trains on the train split of the data (`compressors.exit_tuning`); the report measures
the original and the tuned model side by side on held-out windows the tuning never saw: the
logit lens's agreement with the model's own final layer at every depth and the oracle saving,
the full model's perplexity, and how often the tuned full model's greedy token equals the
original's. The artifact keeps the LoRA (`tuning.safetensors`) and the `tune` stage (settings,
the train windows, the measurements); every loader bakes it in before anything else, so later
stages (probe, calibrate, prune, steer, run, bench, export) work on the tuned model.
`merge_out` writes the tuned weights as a Hugging Face checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dyninfer.compressors.exit_tuning import DRAFT_VOCABULARY, TUNING_PREFIX, TuningRecord, draft_vocabulary, fingerprint, tune_exits
from dyninfer.compressors.steering import steered
from dyninfer.core import stages
from dyninfer.core.artifact_files import staged_directory
from dyninfer.core.artifact_paths import artifact_exists, give_usual_modes
from dyninfer.core.artifacts import Artifact
from dyninfer.core.choices import CURRICULA, DEPTH_WEIGHTINGS, EXIT_TARGETS, LOGIT
from dyninfer.core.cost import count_costs
from dyninfer.core.errors import DyninferError, option
from dyninfer.core.lenses import LogitLens
from dyninfer.core.progress import ProgressFn
from dyninfer.core.records import TuneRecord
from dyninfer.jobs.configs import TuneConfig
from dyninfer.profilers.exit_probe import heldout_quality, run_probe
from dyninfer.runtime.loader import ModelSession, lens_provenance, workspace_for

__all__ = ["CURRICULA", "DEPTH_WEIGHTINGS", "EXIT_TARGETS", "TuneConfig", "TuneReport", "run", "save"]


@dataclass
class ModelMeasures:
    """One model (original or tuned) on the held-out windows."""

    perplexity: float
    agreement: list[float]  # logit lens, per hidden-state index 0..L: top-1 equal to this model's final top-1
    kl: list[float]  # KL(final || layer) per index
    oracle_saving: float  # compute saved by exiting each token at its prediction depth

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TuneReport:
    config: TuneConfig
    base_model: dict
    data: dict
    training: TuningRecord
    original: ModelMeasures
    tuned: ModelMeasures
    final_agreement: float  # tuned full model's greedy token equal to the original's, held-out positions
    timings: dict
    draft_vocabulary: dict | None = None  # {size, heldout_coverage}: the share of held-out tokens it holds
    notes: list[str] = field(default_factory=list)
    placement: dict | None = None
    merged_to: str | None = None
    artifact: Artifact | None = None

    @property
    def perplexity_change(self) -> float:
        return self.tuned.perplexity / self.original.perplexity - 1

    def summary(self) -> dict:
        return {
            "command": "tune-exits",
            "model": self.base_model,
            "data": self.data,
            "config": asdict(self.config),
            "training": self.training.summary(),
            "original": self.original.to_dict(),
            "tuned": self.tuned.to_dict(),
            "perplexity_change": self.perplexity_change,
            "final_agreement": self.final_agreement,
            "draft_vocabulary": self.draft_vocabulary,
            "timings": self.timings,
            "notes": self.notes,
            "placement": self.placement,
            "merged_to": self.merged_to,
        }

    def files(self) -> dict[str, bytes]:
        """The tune/ report folder: the summary, with every training step's losses."""
        history = [dict(row) for row in self.training.history]
        return {"summary.json": json.dumps(self.summary(), indent=2, default=str).encode(), "history.json": json.dumps(history).encode()}


def _measure(lm, heldout: torch.Tensor, costs, progress: ProgressFn | None, what: str) -> tuple[ModelMeasures, torch.Tensor]:
    perplexity, argmax = heldout_quality(lm, heldout)
    result = run_probe(lm, heldout, [LogitLens(lm)], costs, progress=_named(progress, what))
    rows = result.layers[result.layers["lens"] == LOGIT]
    measures = ModelMeasures(
        perplexity, [float(v) for v in rows["agreement"]], [float(v) for v in rows["kl"]], float(result.oracle[LOGIT].saving)
    )
    return measures, argmax


def _named(progress: ProgressFn | None, what: str) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda description, done, total: progress(f"{description} ({what})", done, total)


def _check_fresh(existing: str | Artifact | None) -> Artifact | None:
    """The artifact to write into: tuning must come first, so one that holds measured stages is refused."""
    if existing is None or (not isinstance(existing, Artifact) and not artifact_exists(existing)):
        return None
    artifact = existing if isinstance(existing, Artifact) else Artifact.load(existing)
    if stages.TUNE in artifact.stages:
        raise DyninferError(f"the artifact is already tuned; tune into a new {option('out')}")
    measured = sorted(s for s in artifact.stages if s not in (stages.LENS,))
    if measured or artifact.tensors:
        raise DyninferError(
            f"the artifact holds {', '.join(measured) or 'tensors'} made on the untuned model; "
            f"tune-exits changes the model under them: tune into a new {option('out')} and run "
            "those stages again on it"
        )
    return artifact


def run(
    config: TuneConfig, progress: ProgressFn | None = None, existing: str | Artifact | None = None, session: ModelSession | None = None
) -> TuneReport:
    """Measure the original model, tune its exits on the train split, measure the tuned model."""
    config.validate()
    artifact = _check_fresh(existing)
    torch.manual_seed(config.seed)
    ws = workspace_for(
        config,
        config.data,
        config.seq_len,
        existing=artifact,
        progress=progress,
        session=session,
        check_data=lambda windows, stored: windows.take("heldout", config.heldout_tokens, option="heldout_tokens"),
    )
    lm, windows = ws.lm, ws.windows
    settings = config.settings()
    settings.depths(lm.num_layers)  # exit layers out of range fail before any work
    heldout = windows.take("heldout", config.heldout_tokens, option="heldout_tokens")
    # At most half the train split: `calibrate` on the same data must draw windows the tuning never saw.
    available = max(1, windows.train.shape[0] // 2)
    needed = config.steps * config.batch_size
    rows = windows.order("train")[: min(available, needed)]  # a random sample; reused in order when short
    notes = []
    if needed > available:
        notes.append(
            f"the steps use {needed} windows and the tuning takes at most half the train split ({available} "
            f"windows; the rest is kept for calibrate): each is seen {needed / available:.1f} times; more "
            "data makes a better tuning"
        )
    costs = count_costs(lm, context=config.seq_len)
    original, original_argmax = _measure(lm, heldout, costs, progress, "original")
    delta, record = tune_exits(lm, windows.train[rows], settings, progress)
    ws.timings["tune_s"] = record.seconds
    with steered(lm, delta, 1.0):
        tuned, tuned_argmax = _measure(lm, heldout, costs, progress, "tuned")
        merged = _merge(ws, config.merge_out) if config.merge_out else None
    report = TuneReport(
        config,
        ws.loaded.base_model_info(),
        windows.describe(),
        record,
        original,
        tuned,
        float((tuned_argmax == original_argmax).float().mean()),
        ws.timings,
        notes=notes,
        placement=ws.loaded.placement,
        merged_to=merged,
    )
    tensors = delta.tensors(TUNING_PREFIX)
    if config.draft_vocab:
        vocabulary = draft_vocabulary(windows.train, lm.vocab_size, config.draft_vocab)  # counting: the whole split
        tensors[DRAFT_VOCABULARY] = vocabulary
        inside = torch.zeros(lm.vocab_size, dtype=torch.bool)
        inside[vocabulary] = True
        report.draft_vocabulary = {"size": int(vocabulary.numel()), "heldout_coverage": float(inside[heldout[:, 1:]].float().mean())}
    ws.artifact.put_tensors(stages.TUNING_GROUP, tensors)
    summary = {k: v for k, v in report.summary().items() if k not in ("command", "tuned")}
    record = TuneRecord(
        windows=lens_provenance(windows, rows), tuned=report.tuned.to_dict(), fingerprint=fingerprint(delta), report=summary
    )
    record.write(ws.artifact)
    report.artifact = ws.artifact
    return report


def _merge(ws, target: str) -> str:
    """Write the tuned weights (baked now) and the tokenizer as a Hugging Face checkpoint, in one swap."""
    with staged_directory(target, lock=False) as staged:
        ws.loaded.model.save_pretrained(staged, safe_serialization=True)
        ws.loaded.tokenizer.save_pretrained(staged)
        give_usual_modes(staged)  # safetensors writes 0600: a checkpoint is shared like any file the user makes
    return str(target)  # as the user gave it: reports show the paths typed, not where they resolve


def save(report: TuneReport, out: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Path:
    """Save the artifact (the LoRA) and its tune/ report folder."""
    return report.artifact.save(out, reports={stages.TUNE: report.files()}, on_wait=on_wait)
