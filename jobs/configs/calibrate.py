"""`dyninfer calibrate`'s options."""

from __future__ import annotations

from dataclasses import dataclass

from dyninfer.core.choices import (
    CONSISTENCY_MEASURES,
    COST_SOURCES,
    DEFAULT_DATA,
    DEFAULT_MODEL,
    FIDELITY_RISK,
    GENERATION_RISK,
    KV_MODES,
    LENS_KINDS,
    MEASURES,
    PROMPT_RISKS,
    RISKS,
    TUNED,
)
from dyninfer.core.errors import DyninferError, check_at_least, check_between, check_choice, check_positive, option
from dyninfer.core.placement import PlacementOptions
from dyninfer.jobs.configs.common import check_config_seed


@dataclass
class CalibrateConfig(PlacementOptions):
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    field: str | None = None
    seq_len: int = 256
    seed: int = 0
    lens: str = TUNED
    # CALM's learned classifier reads the hidden state: a check costs ~2d FLOPs instead of the
    # LM head, which on small models costs more than the layers an exit can save.
    measure: str = "classifier"
    target: float = 0.95
    epsilon: float = 0.05
    # generation: certify the dynamic model's own continuations; the teacher-forced risks simulate exits.
    risk: str = GENERATION_RISK
    # generation risk: prompts (one per random train window), their length and the continuation length
    prompts: int = 128
    heldout_prompts: int = 32
    prompt_tokens: int = 64
    new_tokens: int = 32
    consistency: str = "tokens"  # generation risk: how a continuation is compared with the full model's
    kl_tau: float | None = None  # fidelity risk: also certify the share of positions with KL(full || dynamic) above it
    batch_size: int = 32  # prompts generated together (each still exits as it would alone)
    fit_tokens: int = 4096  # half fits the classifier, half chooses the exit points and the candidate grid
    calibration_tokens: int = 32768  # teacher-forced risks: whole windows, LTT's examples
    heldout_tokens: int = 4096
    vocab_top_k: int = 0
    min_layer: int | None = None
    max_points: int = 8
    kv_mode: str = "propagate"
    lens_from: str | None = None
    lens_train_tokens: int = 16384
    lens_steps: int = 60
    cost: str = "auto"
    # More targets to calibrate on the same traces (reported; the artifact keeps `target`'s policy).
    extra_targets: tuple[float, ...] = ()
    # generation risk: continue each candidate's runs from the previous candidate's (the same certified result for
    # less work, certification/exits.py's CandidateRuns); False generates every candidate anew (benchmarks compare)
    reuse_runs: bool = True

    def validate(self) -> None:
        self.placement().validate()
        check_config_seed(self)
        for name, allowed in (
            ("lens", LENS_KINDS),
            ("measure", MEASURES),
            ("risk", RISKS),
            ("kv_mode", KV_MODES),
            ("cost", COST_SOURCES),
            ("consistency", CONSISTENCY_MEASURES),
        ):
            check_choice(name, getattr(self, name), allowed)
        for name, value in (("target", self.target), ("epsilon", self.epsilon), *(("extra_targets", t) for t in self.extra_targets)):
            check_between(name, value, 0.0, 1.0)
        for name, low in (
            ("fit_tokens", 1),
            ("calibration_tokens", 1),
            ("heldout_tokens", 1),
            ("prompts", 1),
            ("heldout_prompts", 1),
            ("prompt_tokens", 1),
            ("new_tokens", 1),
            ("batch_size", 1),
            ("vocab_top_k", 0),
            ("max_points", 1),
            ("seq_len", 2),
        ):
            check_at_least(name, getattr(self, name), low)
        if self.kl_tau is not None:
            check_positive("kl_tau", self.kl_tau)
            if self.risk != FIDELITY_RISK:
                raise DyninferError(f"{option('kl_tau')} is for {option('risk')} {FIDELITY_RISK}; leave it out")
        if self.risk in PROMPT_RISKS and self.prompt_tokens > self.seq_len:
            raise DyninferError(
                f"{option('prompt_tokens')} {self.prompt_tokens} is longer than the windows prompts "
                f"are cut from ({option('seq_len')} {self.seq_len}); lower it or raise "
                f"{option('seq_len')}"
            )
