"""`calibrate`: workspace -> lens -> calibration -> policy recorded in the artifact.

`save` writes the artifact and its `calibrate/` report folder (the threshold curve as CSV and PNG,
the summary).
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from dyninfer.certification.calibrate import calibrate_exits
from dyninfer.certification.exits import PromptSet
from dyninfer.core import stages
from dyninfer.core.artifacts import Artifact
from dyninfer.core.choices import FIDELITY_RISK, GENERATION_RISK, PROMPT_RISKS, TOP1, TUNED
from dyninfer.core.cost import count_costs, measured_cost, profile_is_stale, speedup_basis
from dyninfer.core.errors import DyninferError, option
from dyninfer.core.lenses import LogitLens
from dyninfer.core.progress import ProgressFn
from dyninfer.core.records import CalibrateRecord, CorpusDraw, ExitCertificate, TrainedWindows, TuneRecord
from dyninfer.early_exit.certify import CalibrationResult, run_calibrations
from dyninfer.jobs.configs import CalibrateConfig
from dyninfer.jobs.plots import calibration_curve_png
from dyninfer.runtime.loader import ModelSession, lens_overlaps, lens_to_train, model_state, trained_on, workspace_for

REPORT_DIR = stages.CALIBRATE


@dataclass
class CalibrateReport:
    config: CalibrateConfig
    base_model: dict
    data: dict
    result: CalibrationResult
    timings: dict
    artifact: Artifact | None = None
    cost_model: dict | None = None  # the cost model the exit points were chosen with
    others: list[CalibrationResult] = field(default_factory=list)  # one per config.extra_targets
    continuations_key: str | None = None  # generation risk: the model state the cached continuations belong to
    placement: dict | None = None  # where the model ran ({device, dtype}): the certificate holds for that dtype

    @property
    def cost_unit(self) -> str:
        """What predicted speedups are ratios of: "latency" (a measured profile) or "FLOPs"."""
        return speedup_basis(self.cost_model)

    def summary(self) -> dict:
        out = {
            "command": "calibrate",
            "model": self.base_model,
            "data": self.data,
            "config": asdict(self.config),
            "timings": self.timings,
            "placement": self.placement,
        } | self.result.to_dict()
        if self.continuations_key is not None:
            out["continuations_key"] = self.continuations_key
        if self.cost_model is not None:
            out["cost_model"] = self.cost_model
        if self.others:
            out["other_targets"] = [_brief(r) for r in self.others]
        return out

    def record(self) -> CalibrateRecord:
        """What the artifact keeps: the policy and its certificate typed, the rest of the summary as reported."""
        result, config = self.result, self.config
        on_prompts = result.risk in PROMPT_RISKS
        measure = {GENERATION_RISK: config.consistency, FIDELITY_RISK: TOP1}.get(result.risk, "tokens")
        certificate = ExitCertificate(
            result.risk,
            result.target,
            result.epsilon,
            [None if math.isinf(x) else float(x) for x in result.ltt.lambdas],
            result.ltt.n,
            measure,
            config.prompt_tokens if on_prompts else None,
            config.new_tokens if on_prompts else None,
            config.kl_tau if result.risk == FIDELITY_RISK else None,
        )
        typed = CalibrateRecord(
            policy=result.policy,
            certificate=certificate,
            corpus=CorpusDraw(self.data["spec"], config.field, self.data["seq_len"], self.data["seed"]),
            predicted_speedup=result.heldout.get("predicted_speedup"),
            cost_unit=self.cost_unit,
            continuations_key=self.continuations_key,
            placement=self.placement,
        )
        typed.report = {k: v for k, v in self.summary().items() if k not in typed.to_dict()}
        return typed

    def figure(self) -> bytes:
        return calibration_curve_png(self.result, f"{self.base_model['spec']} on {self.data['spec']}", self.others, self.cost_unit)

    def files(self) -> dict[str, bytes]:
        """The calibrate/ report folder: the threshold curve (CSV, PNG) and the summary."""
        curve = io.StringIO()
        pd.DataFrame([vars(c) for c in self.result.curve]).to_csv(curve, index=False)
        return {
            "curve.csv": curve.getvalue().encode(),
            "summary.json": json.dumps(self.summary(), indent=2, default=str).encode(),
            "curve.png": self.figure(),
        }


def _brief(result: CalibrationResult) -> dict:
    """A policy at another target: what it decided and what it achieved on held-out data."""
    return {
        "target": result.target,
        "policy": result.policy.to_dict(),
        "heldout": result.heldout,
        "naive_heldout": result.naive_heldout,
        "generated": result.generated,
        "statement": result.ltt.statement(),
        "notes": result.notes,
    }


def choose_costs(config: CalibrateConfig, lm, artifact: Artifact) -> tuple:
    """(cost model, notes): measured latency from the artifact's profile, or FLOPs."""
    measured = measured_cost(artifact) if config.cost != "flops" else None
    if config.cost == "measured" and measured is None:
        raise DyninferError(
            f"{option('cost')} measured needs a profile in the artifact: run `dyninfer profile` "
            f"into it first, or use {option('cost')} flops"
        )
    if measured is None:
        return count_costs(lm, context=config.seq_len), []
    notes = [
        f"exit points chosen with the decode latency measured by `profile` ({measured.source}); predicted speedups are for that machine"
    ]
    if measured.num_layers != lm.num_layers:
        raise DyninferError(
            f"the artifact's profile has {measured.num_layers} layers but the model has "
            f"{lm.num_layers}; re-run `dyninfer profile` on this artifact"
        )
    if profile_is_stale(artifact):
        notes.append(
            "the profile was measured before the artifact's pruning masks changed the model; re-run "
            "`dyninfer profile` on it for predictions that match"
        )
    if measured.context != config.seq_len:
        notes.append(f"the profile measured decoding at context {measured.context}, calibration uses {option('seq_len')} {config.seq_len}")
    return measured, notes


@dataclass
class Draw:
    """The random units one calibration uses: rows of the train split (lens excluded) and of held-out."""

    fit: torch.Tensor
    units: torch.Tensor  # calibration windows (teacher-forced) or prompt windows (generation)
    heldout: torch.Tensor  # held-out windows (simulated numbers)
    heldout_prompts: torch.Tensor | None  # held-out prompt windows (generation)


def draw_units(config: CalibrateConfig, windows, lens_rows: set[int]) -> Draw:
    """Fit windows, then calibration units, from the train split's random order (skipping the windows the tuned
    lens or the tuning trained on)."""
    n_fit = math.ceil(config.fit_tokens / config.seq_len)
    generation = config.risk in PROMPT_RISKS
    n_units = config.prompts if generation else math.ceil(config.calibration_tokens / config.seq_len)
    order = [r for r in windows.order("train").tolist() if r not in lens_rows]
    if n_fit + n_units > len(order):
        asked = (
            f"{option('prompts')} {config.prompts} prompts"
            if generation
            else f"{option('calibration_tokens')} {config.calibration_tokens} tokens"
        )
        raise DyninferError(
            f"the train split of '{config.data}' has {len(order)} windows of {config.seq_len} tokens the tuned lens and "
            f"the tuning did not train on, but {option('fit_tokens')} and {asked} need {n_fit + n_units} (one window per unit); "
            f"lower them, lower {option('seq_len')} or use more data"
        )
    held_order = windows.order("heldout")
    if generation and config.heldout_prompts > held_order.numel():
        raise DyninferError(
            f"the held-out split has {held_order.numel()} windows but {option('heldout_prompts')} is "
            f"{config.heldout_prompts}; lower it or use more data"
        )
    return Draw(
        torch.tensor(order[:n_fit]),
        torch.tensor(order[n_fit : n_fit + n_units]),
        windows.take_rows("heldout", config.heldout_tokens, option="heldout_tokens"),
        held_order[: config.heldout_prompts] if generation else None,
    )


def _lens_tokens(config: CalibrateConfig, stored: Artifact | None) -> int:
    """The train tokens a tuned lens trained by this calibration takes (0: none is trained)."""
    return config.lens_train_tokens if config.lens == TUNED and lens_to_train(stored, config.lens_from) else 0


def check_draw(config: CalibrateConfig, windows, lens_tokens: int = 0, excluded: set[int] | frozenset[int] = frozenset()) -> None:
    """Before any work: the data holds the windows calibration will draw, even after a tuned lens of `lens_tokens`
    training tokens (trained first, on train windows calibration then skips) takes its share, and without the train
    rows `excluded` (a tuning's)."""
    lens_rows = {int(r) for r in windows.take_rows("train", lens_tokens, option="lens_train_tokens")} if lens_tokens else set()
    draw_units(config, windows, lens_rows | excluded)


def _trained_rows(provenance: TrainedWindows | None, windows, draw: Draw) -> tuple[set[int], int | None]:
    """The train rows a record's windows cover, and how many of the draw's held-out rows they touch (None: other data)."""
    train_rows = torch.arange(windows.train.shape[0])
    seen = {int(r) for r, hit in zip(train_rows, lens_overlaps(provenance, windows, "train", train_rows) or []) if hit}
    held = [draw.heldout] + ([draw.heldout_prompts] if draw.heldout_prompts is not None else [])
    return seen, trained_on(provenance, windows, "heldout", torch.unique(torch.cat(held)))


def lens_notes(ws, windows, draw: Draw) -> tuple[set[int], list[str]]:
    """The train rows the tuned lens trained on (kept out of fit and calibration), and what to tell the user."""
    provenance = ws.lens_windows()
    if provenance is None:
        return set(), [
            f"the tuned lens's training windows are not recorded (an older artifact, or {option('lens_from')} "
            "one without a record); the guarantee assumes it did not train on calibration or held-out text"
        ]
    seen, overlap = _trained_rows(provenance, windows, draw)
    notes = []
    if overlap is None:
        notes.append(f"the tuned lens was trained on other data ({provenance.data})")
    elif overlap:
        notes.append(
            f"the tuned lens trained on text of {overlap} held-out windows (another seed or window length "
            "split the corpus differently); held-out numbers are optimistic. Retrain it with this split "
            f"({option('lens_from')} off, a fresh artifact) for clean ones"
        )
    return seen, notes


def tuning_notes(record: TuneRecord | None, windows, draw: Draw) -> tuple[set[int], list[str]]:
    """The train rows the tune-exits LoRA trained on (kept out of fit and calibration), and what to tell the user."""
    if record is None:
        return set(), []
    provenance = record.windows
    seen, overlap = _trained_rows(provenance, windows, draw)
    if overlap is None:
        return seen, [
            f"the model was tuned on other data ({provenance.data if provenance else 'unknown'}); the guarantee assumes "
            "the tuning saw none of this calibration's text"
        ]
    if overlap:
        return seen, [
            f"the model was tuned on text of {overlap} held-out windows (another seed or window length "
            "split the corpus differently); held-out numbers are optimistic"
        ]
    return seen, []


def run(
    config: CalibrateConfig, progress: ProgressFn | None = None, existing: str | Artifact | None = None, session: ModelSession | None = None
) -> CalibrateReport:
    """Calibrate the policy at `config.target` (and `extra_targets`); the artifact keeps the first."""
    config.validate()
    torch.manual_seed(config.seed)
    ws = workspace_for(
        config,
        config.data,
        config.seq_len,
        existing=existing,
        progress=progress,
        session=session,
        check_data=lambda windows, stored: check_draw(config, windows, _lens_tokens(config, stored)),
    )
    lm, windows = ws.lm, ws.windows
    generation = config.risk in PROMPT_RISKS
    _check_model(config, lm)
    lens, draw, notes = _lens_and_draw(config, ws, progress)
    costs, cost_notes = choose_costs(config, lm, ws.artifact)
    notes += cost_notes
    targets = [config.target, *config.extra_targets]
    fit, units, heldout = windows.train[draw.fit], windows.train[draw.units], windows.heldout[draw.heldout]
    if generation:
        results = _generation_calibrations(config, ws, lens, costs, fit, units, heldout, draw, targets, progress)
    else:
        results = run_calibrations(
            lm,
            lens,
            costs,
            fit,
            units,
            heldout,
            targets=targets,
            measure=config.measure,
            epsilon=config.epsilon,
            risk=config.risk,
            vocab_top_k=config.vocab_top_k,
            min_layer=config.min_layer,
            max_points=config.max_points,
            progress=progress,
        )
    (result, classifier), others = results[0], [r for r, _ in results[1:]]
    ws.timings |= result.work
    for other in others:
        other.policy.kv_mode = config.kv_mode
    result.policy.kv_mode = config.kv_mode
    result.notes += notes
    report = CalibrateReport(
        config,
        ws.loaded.base_model_info(),
        windows.describe(),
        result,
        ws.timings,
        cost_model=costs.to_dict(),
        others=others,
        continuations_key=model_state_key(ws) if generation else _stored_continuations_key(ws),
        placement=ws.loaded.placement,
    )
    report.record().write(ws.artifact)
    _store_exits(ws.artifact, classifier)
    report.artifact = ws.artifact
    return report


def _check_model(config: CalibrateConfig, lm) -> None:
    """What the options ask of the model: the prompt and its continuation within its context, the top-k within its
    vocabulary."""
    context = lm.context_length
    if config.risk in PROMPT_RISKS and context and config.prompt_tokens + config.new_tokens > context:
        raise DyninferError(
            f"{option('prompt_tokens')} {config.prompt_tokens} + {option('new_tokens')} "
            f"{config.new_tokens} exceed the model's context of {context} tokens; lower them"
        )
    if config.vocab_top_k > lm.vocab_size:
        raise DyninferError(
            f"{option('vocab_top_k')} {config.vocab_top_k} is more than the model's {lm.vocab_size} tokens; pass at most "
            f"{lm.vocab_size} (0 scores the whole vocabulary)"
        )


def _lens_and_draw(config: CalibrateConfig, ws, progress: ProgressFn | None) -> tuple:
    """(the exit head, the units drawn, notes): the tuned lens trains first, on train windows the draw then skips, and
    the windows a tuning trained on stay out of fit and calibration (the tuned model is not independent of them)."""
    windows = ws.windows
    draw = draw_units(config, windows, set())  # for the held-out rows, which depend on nothing trained
    seen, notes = tuning_notes(TuneRecord.read(ws.artifact), windows, draw)
    # The data must hold both the lens's windows and the draw, known before the lens trains.
    check_draw(config, windows, _lens_tokens(config, ws.artifact), seen)
    if config.lens == TUNED:
        lens, _ = ws.tuned_lens(
            lens_from=config.lens_from, train_tokens=config.lens_train_tokens, steps=config.lens_steps, seed=config.seed, progress=progress
        )
        lens_rows, lens_messages = lens_notes(ws, windows, draw)
        notes += lens_messages
        seen |= lens_rows
    else:
        lens = LogitLens(ws.lm)
    return lens, draw_units(config, windows, seen) if seen else draw, notes


def _store_exits(artifact: Artifact, classifier) -> None:
    """The exits group holds the tuned lens and, for the classifier measure, this policy's classifier."""
    exits = {k: v for k, v in artifact.tensors.get(stages.EXITS_GROUP, {}).items() if not k.startswith("classifier.")}
    if classifier is not None:
        exits.update(classifier.tensors())
    if exits:
        artifact.put_tensors(stages.EXITS_GROUP, exits)


def _generation_calibrations(
    config: CalibrateConfig, ws, lens, costs, fit, units, heldout, draw: Draw, targets: list[float], progress: ProgressFn | None
) -> list:
    """The full model's continuations (cached in the artifact), then `calibrate_exits` on a prompt risk."""
    windows = ws.windows
    started = time.perf_counter()
    prompt_sets = {
        "calibration": PromptSet(units[:, : config.prompt_tokens], None, new_tokens=config.new_tokens),
        "heldout": PromptSet(windows.heldout[draw.heldout_prompts][:, : config.prompt_tokens], None, new_tokens=config.new_tokens),
    }
    for what, prompt_set in prompt_sets.items():  # from an earlier run on this model state, else generated by certification
        stored = stored_continuations(ws, config, prompt_set.prompts, what)
        if stored is not None:
            prompt_set.set_continuations(stored)
    generated = [what for what, prompt_set in prompt_sets.items() if prompt_set.continuations is None]
    results = calibrate_exits(
        ws.lm,
        lens,
        costs,
        fit,
        prompt_sets["calibration"],
        heldout,
        targets=targets,
        risk=config.risk,
        measure=config.measure,
        epsilon=config.epsilon,
        vocab_top_k=config.vocab_top_k,
        min_layer=config.min_layer,
        max_points=config.max_points,
        kv_mode=config.kv_mode,
        prompt_tokens=config.prompt_tokens,
        new_tokens=config.new_tokens,
        consistency=config.consistency,
        kl_tau=config.kl_tau,
        heldout_prompts=prompt_sets["heldout"],
        batch_size=config.batch_size,
        progress=progress,
        reuse=config.reuse_runs,
    )
    for what in generated:
        store_continuations(ws, what, prompt_sets[what])
    ws.timings["certify_s"] = time.perf_counter() - started
    return results


def _stored_continuations_key(ws) -> str | None:
    record = CalibrateRecord.read(ws.artifact)
    return None if record is None else record.continuations_key


def model_state_key(ws) -> str:
    return model_state(ws.session, ws.artifact)


def stored_continuations(ws, config: CalibrateConfig, prompts: torch.Tensor, what: str) -> torch.Tensor | None:
    """The full model's continuations of `prompts` from the artifact, when it holds them for this model state."""
    group = ws.artifact.tensors.get(stages.GENERATION_GROUP, {})
    old_prompts, old = group.get(f"{what}.prompts"), group.get(f"{what}.continuations")
    if (
        _stored_continuations_key(ws) == model_state_key(ws)
        and old_prompts is not None
        and old is not None
        and old_prompts.shape == prompts.shape
        and torch.equal(old_prompts, prompts)
        and old.shape[1] >= config.new_tokens
    ):
        return old[:, : config.new_tokens]
    return None


def store_continuations(ws, what: str, prompt_set: PromptSet) -> None:
    """Keep the continuations in the artifact for the next calibration of this model state."""
    group = dict(ws.artifact.tensors.get(stages.GENERATION_GROUP, {}))
    group |= {f"{what}.prompts": prompt_set.prompts.clone(), f"{what}.continuations": prompt_set.continuations}
    ws.artifact.put_tensors(stages.GENERATION_GROUP, group)


def save(report: CalibrateReport, out: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Path:
    """Save the artifact (policy, classifier) and its calibrate/ report folder."""
    return report.artifact.save(out, reports={REPORT_DIR: report.files()}, on_wait=on_wait)
