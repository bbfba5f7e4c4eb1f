"""`stop`: fit and certify a stop rule on an artifact's model, and record it beside the exit policy.

Units are drawn at random and never overlap: completion prompts are the starts of corpus windows
(fit and calibration from the train split's random order, held-out from the held-out split);
reasoning problems are shuffled with the seed and cut into fit, calibration and held-out. The fit
units choose the signal and the candidate thresholds; Learn-then-Test certifies one on the
calibration units; the held-out units report what it does. `save` writes the artifact and its
`stop-WORKLOAD/` report folder (the candidate curve as CSV, the summary).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from dyninfer.compressors.cot_data import load_problems
from dyninfer.compressors.steer_extract import CotPrompter, load_cot_split
from dyninfer.compressors.stop_certify import StopCertificate, certify, choose_signal, empirical_choice
from dyninfer.compressors.stop_simulate import CompletionRuns, ReasoningRun, outcome
from dyninfer.core import stages
from dyninfer.core.artifact_paths import artifact_exists
from dyninfer.core.artifacts import Artifact, BaseModelInfo
from dyninfer.core.choices import COMPLETION, REASONING, STOP_SIGNALS
from dyninfer.core.data import TokenWindows, load_windows
from dyninfer.core.errors import DyninferError, option
from dyninfer.core.policies import PROBE_SUFFIX, StopPolicy
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.core.provenance import provenance
from dyninfer.core.records import SteerRecord, StopDraw, StopRecord, StopRule, TuneRecord
from dyninfer.jobs.configs import StopConfig
from dyninfer.profilers.stop_bench import StopRequests
from dyninfer.profilers.stop_runs import completion_runs, reasoning_runs
from dyninfer.runtime.loader import (
    LoadedDynamic,
    ModelSession,
    build_dynamic,
    lens_overlaps,
    model_state,
    probe_vocabulary,
    trained_on,
    workspace_for,
)

REPORT_DIR = stages.STOP


@dataclass
class StopReport:
    config: StopConfig
    base_model: dict
    data: dict
    policy: StopPolicy
    certificate: StopCertificate
    fit: dict  # per signal: what the fit split says it saves at the target
    timings: dict
    notes: list[str] = field(default_factory=list)
    artifact: Artifact | None = None
    provenance: dict = field(default_factory=provenance)  # the commit, versions and command line it ran with

    def summary(self) -> dict:
        return {
            "command": "stop",
            "model": self.base_model,
            "data": self.data,
            "config": asdict(self.config),
            "policy": self.policy.to_dict(),
            "certificate": self.certificate.to_dict(),
            "statement": self.certificate.statement(),
            "empirical_choice": empirical_choice(self.certificate.curve, self.config.target),
            "fit": self.fit,
            "timings": self.timings,
            "notes": self.notes,
            "provenance": self.provenance,
        }

    def files(self) -> dict[str, bytes]:
        curve = io.StringIO()
        pd.DataFrame(self.certificate.curve).to_csv(curve, index=False)
        return {"curve.csv": curve.getvalue().encode(), "summary.json": json.dumps(self.summary(), indent=2, default=str).encode()}


def _check_counts(draw: StopDraw, train: int, heldout: int, what: str) -> None:
    needed = draw.fit_prompts + draw.prompts
    if train < needed or heldout < draw.heldout_prompts:
        raise DyninferError(
            f"'{draw.data}' gives {train} {what} to fit and calibrate on and {heldout} held out, but "
            f"{option('fit_prompts')} + {option('prompts')} need {needed} and {option('heldout_prompts')} "
            f"{draw.heldout_prompts}; lower them or use more data"
        )


def check_windows(config: StopConfig, windows: TokenWindows) -> None:
    """Completion data: enough windows, each a prompt followed by its real continuation."""
    if windows.train.shape[1] < config.prompt_tokens + config.new_tokens:
        raise DyninferError(
            f"'{config.resolved_data()}' has no reference continuation of {config.new_tokens} tokens after prompts of "
            f"{config.prompt_tokens}; use longer documents or lower {option('prompt_tokens')}/{option('new_tokens')}"
        )
    _check_counts(config.draw(), windows.train.shape[0], windows.heldout.shape[0], "prompts (windows with a real continuation)")


def _certify(config: StopConfig, runs: dict) -> tuple[StopCertificate, dict, str]:
    """The signal, probe sites and candidates from the fit units, the certificate from the calibration units, the
    report from the held-out units. Returns (certificate, what each choice saves on the fit units, probe sites)."""
    signals = STOP_SIGNALS[config.workload] if config.signal == "auto" else (config.signal,)
    if config.workload == COMPLETION:
        signal, grid, fit = choose_signal(config.workload, runs["fit"], signals, config.target, config.epsilon, config.condition)
        probe_at = StopPolicy.probe_at
    else:  # each probe site's view of the runs; on a tie the fewer probes (line ends) win
        sites = ("lines", "sentences") if config.probe_at == "auto" else (config.probe_at,)
        chosen, fit = None, {}
        for site in sites:
            seen = {what: [run.at(site) for run in units] for what, units in runs.items()}
            best, site_grid, found = choose_signal(config.workload, seen["fit"], signals, config.target, config.epsilon, config.condition)
            fit |= {f"{s} at {site[:-1]} ends": f for s, f in found.items()}
            if chosen is None or found[best]["tokens_saved"] > chosen[0]:
                chosen = (found[best]["tokens_saved"], site, best, site_grid, seen)
        _, probe_at, signal, grid, runs = chosen
    certificate = certify(config.workload, runs["calibration"], grid, signal, config.target, config.epsilon, config.condition)
    certificate.heldout = outcome(config.workload, runs["heldout"], signal, certificate.threshold)
    certificate.heldout_never = outcome(config.workload, runs["heldout"], signal, None)
    return certificate, fit, probe_at


def _policy(config: StopConfig, certificate: StopCertificate, state: str, probe_at: str) -> StopPolicy:
    return StopPolicy(
        workload=config.workload,
        signal=certificate.signal,
        threshold=certificate.threshold,
        target=config.target,
        epsilon=config.epsilon,
        new_tokens=config.new_tokens if config.workload == COMPLETION else config.chain_tokens,
        value_unit=config.value_unit,
        condition=config.condition,
        mode=config.mode,
        model_state=state,
        probe_tokens=config.probe_tokens,
        statement=certificate.statement(),
        probe_at=probe_at,
    ).check()


def _dynamic(config: StopConfig, artifact: Artifact, session: ModelSession) -> LoadedDynamic:
    dyn = build_dynamic(artifact, session, require_policy=config.mode == "early-exit", full_depth_is_enough=True)
    if config.mode == "early-exit" and dyn.policy is None:
        raise DyninferError(f"{option('mode')} early-exit needs the artifact's exit policy; run `dyninfer calibrate` into it first")
    return dyn


def _completion(config: StopConfig, existing, session, progress) -> StopReport:
    report = progress or silent
    seq_len = config.prompt_tokens + config.new_tokens
    ws = workspace_for(
        config,
        config.resolved_data(),
        seq_len,
        existing=existing,
        progress=progress,
        session=session,
        check_data=lambda windows, _: check_windows(config, windows),
        length_options=("prompt_tokens", "new_tokens"),
    )
    dyn = _dynamic(config, ws.artifact, ws.session)
    windows = ws.windows
    order, notes = _untrained_order(ws.artifact, windows)
    if order.numel() < config.fit_prompts + config.prompts:
        raise DyninferError(
            f"after the {windows.order('train').numel() - order.numel()} windows the tune-exits LoRA trained on, the train split "
            f"holds {order.numel()} prompts, but {option('fit_prompts')} + {option('prompts')} need {config.fit_prompts + config.prompts}"
        )
    rows = {
        "fit": order[: config.fit_prompts],
        "calibration": order[config.fit_prompts : config.fit_prompts + config.prompts],
    }
    held = windows.order("heldout")[: config.heldout_prompts]
    started = time.perf_counter()
    decode = lambda ids: ws.loaded.tokenizer.decode(ids)
    runs: dict[str, CompletionRuns] = {}
    for what, source in (
        ("fit", windows.train[rows["fit"]]),
        ("calibration", windows.train[rows["calibration"]]),
        ("heldout", windows.heldout[held]),
    ):
        runs[what] = completion_runs(
            dyn.dynamic,
            source[:, : config.prompt_tokens],
            source[:, config.prompt_tokens : seq_len],
            mode=config.mode,
            batch_size=config.batch_size,
            value_unit=config.value_unit,
            decode=decode,
            progress=report,
            what=f"completions ({what})",
        )
    ws.timings["generate_s"] = time.perf_counter() - started

    certificate, fit, probe_at = _certify(config, runs)
    policy = _policy(config, certificate, model_state(ws.session, ws.artifact), probe_at)
    data = windows.describe() | {"fit_rows": len(rows["fit"]), "calibration_rows": len(rows["calibration"]), "heldout_rows": len(held)}
    return _finish(config, ws.loaded.base_model_info(), data, policy, certificate, fit, ws.timings, ws.artifact, notes)


def _untrained_order(artifact: Artifact, windows: TokenWindows) -> tuple[torch.Tensor, list[str]]:
    """The train split's random order without the windows the artifact's tune-exits LoRA trained on (the tuned
    model is not independent of them), and a note when they are unknown or the held-out split overlaps them."""
    order = windows.order("train")
    record = TuneRecord.read(artifact)
    if record is None:
        return order, []
    seen = lens_overlaps(record.windows, windows, "train", order)
    if seen is None:
        return order, [
            f"the model was tuned on other data ({record.windows.data if record.windows else 'unknown'}); the guarantee assumes the "
            "tuning saw none of it"
        ]
    held = trained_on(record.windows, windows, "heldout", windows.order("heldout"))
    notes = [f"the model was tuned on text of {held} held-out windows; held-out numbers are optimistic"] if held else []
    return order[[not hit for hit in seen]], notes


def steering_questions(artifact: Artifact | None) -> set[str]:
    """The questions the artifact's steering directions were made or swept on (their training and held-out
    problems): a stop rule certified on the steered model must not be evaluated on them."""
    record = SteerRecord.read(artifact) if artifact is not None else None
    questions: set[str] = set()
    for extraction in (record.methods if record is not None else {}).values():
        split = extraction.get("split") if isinstance(extraction, dict) else None
        if split:
            train, held = load_cot_split(split["data"], split["seed"], split["examples"], split["heldout"])
            questions |= {p.question for p in train + held}
    return questions


def split_problems(draw: StopDraw, exclude: set[str] = frozenset()) -> dict[str, list]:
    """Fit, calibration and held-out problems: disjoint, from one random order of the source, without the
    questions in `exclude`."""
    total = draw.fit_prompts + draw.prompts + draw.heldout_prompts
    problems = [p for p in load_problems(draw.data, draw.seed, total + len(exclude)) if p.question not in exclude]
    problems = problems[:total]
    held = min(len(problems), draw.heldout_prompts)
    _check_counts(draw, len(problems) - held, held, "problems")
    return {
        "fit": problems[: draw.fit_prompts],
        "calibration": problems[draw.fit_prompts : draw.fit_prompts + draw.prompts],
        "heldout": problems[draw.fit_prompts + draw.prompts :],
    }


def problem_prompts(prompter: CotPrompter, problems: list) -> list[torch.Tensor]:
    tokenizer = prompter.tokenizer
    return [torch.tensor([tokenizer(prompter.prompt(p.question), add_special_tokens=not prompter.chat)["input_ids"]]) for p in problems]


def _reasoning(config: StopConfig, existing, session, progress) -> StopReport:
    report = progress or silent
    stored = existing if isinstance(existing, Artifact) else (Artifact.load(existing) if existing and artifact_exists(existing) else None)
    excluded = steering_questions(stored)
    split = split_problems(config.draw(), excluded)  # bad data fails before the model loads
    timings = {}
    started = time.perf_counter()
    if session is None or session.loaded.spec != config.model:
        report("loading model", 0, 1)
        session = ModelSession.load(config.model, config.placement())
    artifact = stored or Artifact(BaseModelInfo.from_dict(session.loaded.base_model_info()), tokenizer=config.model)
    dyn = _dynamic(config, artifact, session)
    timings["load_model_s"] = time.perf_counter() - started
    tokenizer = session.loaded.tokenizer
    shots = split["fit"][: config.shots]
    if any(not s.long for s in shots):
        raise DyninferError(f"{option('shots')} needs worked chains ('long') in the data; pass {option('shots')} 0")
    prompter = CotPrompter(tokenizer, shots)
    vocabulary = probe_vocabulary(tokenizer, PROBE_SUFFIX)
    recording = StopPolicy(
        REASONING, "confidence", None, config.target, config.epsilon, config.chain_tokens, probe_tokens=config.probe_tokens
    )
    context = session.lm.context_length
    runs: dict[str, list[ReasoningRun]] = {}
    started = time.perf_counter()
    for what, problems in split.items():
        prompts = problem_prompts(prompter, problems)
        longest = max(p.shape[1] for p in prompts)
        if context and longest + config.chain_tokens + len(vocabulary.suffix) + config.probe_tokens > context:
            raise DyninferError(
                f"a prompt of {longest} tokens and a chain of {option('chain_tokens')} {config.chain_tokens} exceed the model's "
                f"context of {context} tokens; lower {option('chain_tokens')} or {option('shots')}"
            )
        runs[what] = reasoning_runs(
            dyn.dynamic,
            prompts,
            problems,
            recording,
            vocabulary,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            mode=config.mode,
            batch_size=config.batch_size,
            eos_token_id=tokenizer.eos_token_id,
            progress=report,
            what=f"chains and probes ({what})",
        )
    timings["generate_s"] = time.perf_counter() - started

    certificate, fit, probe_at = _certify(config, runs)
    policy = _policy(config, certificate, model_state(session, artifact), probe_at)
    data = {"spec": config.resolved_data(), "seed": config.seed, "excluded_steering_questions": len(excluded)}
    data |= {f"{k}_problems": len(v) for k, v in split.items()}
    notes = [f"{len(excluded)} questions the steering was made or swept on are kept out of the units"] if excluded else []
    return _finish(config, session.loaded.base_model_info(), data, policy, certificate, fit, timings, artifact, notes)


def heldout_requests(dyn: LoadedDynamic, workload: str, count: int) -> tuple[StopDraw, StopRequests]:
    """The stop job's own held-out units (the first `count`), drawn again as the rule's record says: prompts never
    used to fit or certify the rule, with what counts as right for each."""
    rule = StopRecord.read(dyn.artifact).rules[workload]
    draw = rule.draw
    if draw is None:
        raise DyninferError(
            f"{dyn.where}'s {workload} stop rule does not record where its units came from; run `dyninfer stop` into it again"
        )
    tokenizer = dyn.loaded.tokenizer
    if draw.workload == COMPLETION:
        seq_len = draw.prompt_tokens + draw.new_tokens
        windows = load_windows(draw.data, tokenizer, field=draw.field, seq_len=seq_len, seed=draw.seed)
        rows = windows.heldout[windows.order("heldout")[:count]]
        return draw, StopRequests([row[None, : draw.prompt_tokens] for row in rows], references=rows[:, draw.prompt_tokens : seq_len])
    split = split_problems(draw, steering_questions(dyn.artifact))
    prompter = CotPrompter(tokenizer, split["fit"][: draw.shots])
    problems = split["heldout"][:count]
    return draw, StopRequests(
        problem_prompts(prompter, problems),
        answers=[p.answer for p in problems],
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
    )


def _finish(config, base_model, data, policy, certificate, fit, timings, artifact, notes=()) -> StopReport:
    report = StopReport(config, base_model, data, policy, certificate, fit, timings, list(notes))
    record = StopRecord.read(artifact) or StopRecord()
    summary = report.summary()
    summary["certificate"] = {k: v for k, v in summary["certificate"].items() if k != "curve"}  # the curve is in the report folder
    record.put(config.workload, StopRule(policy, config.draw(), summary))
    record.write(artifact)
    report.artifact = artifact
    return report


def run(config: StopConfig, progress: ProgressFn | None = None, existing: str | Artifact | None = None, session=None) -> StopReport:
    """Fit and certify a stop rule (the artifact keeps one per workload)."""
    config.validate()
    torch.manual_seed(config.seed)
    if config.workload == COMPLETION:
        return _completion(config, existing, session, progress)
    return _reasoning(config, existing, session, progress)


def save(report: StopReport, out: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Path:
    return report.artifact.save(out, reports={f"{REPORT_DIR}-{report.config.workload}": report.files()}, on_wait=on_wait)
