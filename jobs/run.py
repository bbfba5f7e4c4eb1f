"""`run`: generate with an artifact's dynamic model (torch) or its exported package (ONNX Runtime).

The result says, for every generated token, the layer it left at and the exit's confidence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from dyninfer.core.choices import LOGIT
from dyninfer.core.errors import DyninferError
from dyninfer.core.policies import StopPolicy
from dyninfer.core.progress import ProgressFn, silent
from dyninfer.core.records import ProbeRecord, TuneRecord
from dyninfer.jobs.configs import RunConfig
from dyninfer.profilers.speculation_cost import measure_step_costs
from dyninfer.runtime.decoding import GenerationResult
from dyninfer.runtime.loader import load_dynamic, stored_stop_policy, stored_stopper
from dyninfer.runtime.onnx_decoder import OnnxDecoder
from dyninfer.runtime.package_format import find_package
from dyninfer.runtime.speculation import SpeculationPlan, plan_speculation


@dataclass
class RunReport:
    config: RunConfig
    result: GenerationResult
    tokens: list[int]
    text: str
    token_texts: list[str]
    num_layers: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        r = self.result
        return {
            "command": "run",
            "mode": self.config.mode,
            "text": self.text,
            "tokens": [
                {"id": t, "text": s, "exit_layer": e, "confidence": c}
                for t, s, e, c in zip(self.tokens, self.token_texts, r.exit_layers, r.confidences)
            ],
            "mean_exit_layer": r.mean_exit_layer,
            "num_layers": self.num_layers,
            "tokens_per_s": r.tokens_per_s,
            "acceptance": r.acceptance,
            "backend": self.config.backend,
            "stop": r.stop,
            "notes": self.notes,
        }


DEFAULT_MAX_DRAFT = 8


def measured_agreement(artifact) -> tuple[list[float] | None, str]:
    """Per depth, how often the logit lens's top-1 equals the final layer's, as the artifact measured it on
    held-out text: its probe (on the model the artifact describes) or its tune-exits report."""
    probe, tune = ProbeRecord.read(artifact), TuneRecord.read(artifact)
    if probe is not None and probe.agreement(LOGIT):
        return probe.agreement(LOGIT), "the probe's held-out agreement (logit lens)"
    if tune is not None and tune.agreement():
        return tune.agreement(), "tune-exits' held-out agreement (logit lens)"
    return None, ""


def speculation_plan(dyn, prompt: torch.Tensor, max_draft: int = DEFAULT_MAX_DRAFT) -> SpeculationPlan | None:
    """The draft layer and length with the best expected speedup, from the artifact's measured agreement and
    step costs timed now on `prompt`; None when the artifact measured no agreement (probe it first)."""
    agreement, source = measured_agreement(dyn.artifact)
    lm = dyn.loaded.layered
    if agreement is None or len(agreement) != lm.num_layers + 1:
        return None
    costs = measure_step_costs(lm, prompt[:1], max_draft, dyn.dynamic.draft_vocabulary)
    return plan_speculation(agreement, costs, max_draft, source)


def draft_settings(dyn, prompt: torch.Tensor, draft_layer: int | None) -> tuple[int | None, int, SpeculationPlan | None]:
    """(draft layer, max drafts, the plan they came from): `draft_layer` when given, else the plan when the
    artifact measured an agreement, else the defaults (70% of the depth, 8 drafts)."""
    plan = None
    if draft_layer is None and not dyn.loaded.layered.adapter.recurrent:
        plan = speculation_plan(dyn, prompt)
    if plan is None:
        return draft_layer, DEFAULT_MAX_DRAFT, None
    return plan.layer, plan.max_draft, plan


def plan_note(plan: SpeculationPlan) -> str:
    needed = (
        f"1.3x would need {plan.needed_for_1_3x:.1%} there"
        if plan.needed_for_1_3x is not None
        else "1.3x is out of reach there even if every draft were accepted"
    )
    return (
        f"speculative: drafting at layer {plan.layer} (up to {plan.max_draft} tokens), planned from "
        f"{plan.source} ({plan.acceptance:.1%} there) and step costs timed here: {plan.predicted_speedup:.2f}x "
        f"expected; {needed}"
    )


def stop_notes_for(policy: StopPolicy, mode: str, max_new_tokens: int) -> list[str]:
    """What differs between this run and the setting the stop rule was certified for."""
    out = [f"{policy.describe()}; certified: {policy.statement}"]
    if mode != policy.mode:
        out.append(f"the stop rule was certified on the {policy.mode} mode; this run uses {mode}, where its guarantee is not tested")
    if max_new_tokens != policy.new_tokens:
        out.append(f"the stop rule was certified for {policy.new_tokens} new tokens; this run asks for {max_new_tokens}")
    return out


def encode_prompt(tokenizer, prompt: str, raw: bool) -> torch.Tensor:
    """The prompt's token ids [1, n]: wrapped in the chat template when the tokenizer has one (unless `raw`)."""
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
        return ids if isinstance(ids, torch.Tensor) else torch.tensor([ids])
    return tokenizer(prompt, return_tensors="pt").input_ids


def run(config: RunConfig, artifact: str | os.PathLike, prompt: str, progress: ProgressFn | None = None) -> RunReport:
    """Generate a continuation of `prompt` with the artifact at `artifact` (or, on ONNX, its package)."""
    config.validate()
    if not prompt.strip():
        raise DyninferError("the prompt is empty; pass some text")
    if config.backend == "onnx":
        from transformers import AutoTokenizer  # seconds to import; only this path needs it at this layer

        package = find_package(artifact)
        runtime = OnnxDecoder(package, provider=config.provider)
        tokenizer = AutoTokenizer.from_pretrained(str(package))
        ids = encode_prompt(tokenizer, prompt, config.raw)
        stopper = runtime.stopper(config.stop) if config.stop is not None else None
        result = runtime.generate(
            ids.numpy(),
            config.max_new_tokens,
            mode=config.mode,
            sample=config.sample,
            temperature=config.temperature,
            seed=config.seed,
            eos_token_id=tokenizer.eos_token_id,
            stop=stopper,
        )
        num_layers = runtime.num_layers
        notes = runtime.certificate_notes(config.mode)
        notes += [] if stopper is None else stop_notes_for(stopper.policy, config.mode, config.max_new_tokens)
    else:
        report = progress or silent
        report("loading model", 0, 1)
        dyn = load_dynamic(
            str(artifact), config.model, require_policy=config.mode == "early-exit", kv_mode=config.kv_mode, placement=config.placement()
        )
        report("loading model", 1, 1)
        tokenizer = dyn.loaded.tokenizer
        ids = encode_prompt(tokenizer, prompt, config.raw)
        layer, max_draft, plan = config.draft_layer, DEFAULT_MAX_DRAFT, None
        stopper, stop_notes = None, []
        if config.stop is not None:
            policy = stored_stop_policy(dyn, config.stop)
            stopper, stop_notes = stored_stopper(dyn, policy), stop_notes_for(policy, config.mode, config.max_new_tokens)
        if config.mode == "speculative":
            layer, max_draft, plan = draft_settings(dyn, ids, config.draft_layer)
        result = dyn.dynamic.generate(
            ids,
            config.max_new_tokens,
            mode=config.mode,
            sample=config.sample,
            temperature=config.temperature,
            seed=config.seed,
            eos_token_id=tokenizer.eos_token_id,
            draft_layer=layer,
            max_draft=max_draft,
            draft_threshold=config.draft_threshold,
            stop=stopper,
        )
        num_layers, notes = dyn.loaded.layered.num_layers, list(dyn.notes) + stop_notes
        if plan is not None:
            notes.append(plan_note(plan))
    tokens = [int(t) for t in result.tokens[0]]
    return RunReport(
        config,
        result,
        tokens,
        tokenizer.decode(tokens, skip_special_tokens=True),
        [tokenizer.decode([t]) for t in tokens],
        num_layers,
        list(result.notes) + notes,
    )
