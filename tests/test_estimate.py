"""The audit's expected duration (jobs/estimate.py): it grows with the work planned, and a stored lens is not trained."""

from __future__ import annotations

import dataclasses

from tiny_models import tiny_model

from dyninfer.core.cost import count_costs
from dyninfer.core.layered import LayeredModel
from dyninfer.jobs.configs import AuditConfig, PruneConfig, audit_steering
from dyninfer.jobs.estimate import Rates, audit_plan, time_rates


def _setup():
    lm = LayeredModel(tiny_model("llama", layers=4))
    return lm, count_costs(lm, context=32)


def test_rates_are_timed_on_the_model():
    lm, costs = _setup()
    rates = time_rates(lm, costs, batch=4, tokens=16)
    assert rates.batched > 0 and rates.decode > 0


def test_the_estimate_follows_the_planned_work():
    lm, costs = _setup()
    rates = Rates(batched=1e9, decode=2e8)
    config = AuditConfig(seq_len=32)
    plan = audit_plan(config, lm, costs, rates)
    assert set(plan) == {"probe", "profile", "calibrate"} and all(v > 0 for v in plan.values())
    # Twice the probe tokens, twice the prompts: more time for that stage only.
    more_probe = audit_plan(
        dataclasses.replace(config, probe=dataclasses.replace(config.probe, tokens=2 * config.probe.tokens)), lm, costs, rates
    )
    assert more_probe["probe"] > plan["probe"] and more_probe["calibrate"] == plan["calibrate"]
    more_prompts = dataclasses.replace(config, calibrate=dataclasses.replace(config.calibrate, prompts=2 * config.calibrate.prompts))
    assert audit_plan(more_prompts, lm, costs, rates)["calibrate"] > plan["calibrate"]
    # A tuned lens already in the artifact is not trained again; the logit lens trains none and scores one lens.
    stored = audit_plan(config, lm, costs, rates, lens_stored=True)
    assert stored["probe"] < plan["probe"]
    assert audit_plan(dataclasses.replace(config, lens="logit"), lm, costs, rates)["probe"] < stored["probe"]
    # Slower rates, longer estimates; optional stages are planned when asked.
    slower = audit_plan(config, lm, costs, Rates(batched=5e8, decode=1e8))
    assert all(slower[k] > plan[k] for k in plan)
    both = dataclasses.replace(config, prune=PruneConfig(), steer=audit_steering("activation"))
    assert {"prune", "steer"} <= set(audit_plan(both, lm, costs, rates))
