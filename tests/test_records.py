"""Typed stage records: artifacts written by release 0.1.0 still load and read, and records carry a version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import save_tiny
from typer.testing import CliRunner

from dyninfer.cli.app import app
from dyninfer.core.artifacts import Artifact
from dyninfer.core.errors import DyninferError
from dyninfer.core.policies import ExitPolicy
from dyninfer.core.records import (
    VERSION_KEY,
    CalibrateRecord,
    LensRecord,
    ProbeRecord,
    ProfileRecord,
    PruneRecord,
    SteerRecord,
    TuneRecord,
    read_all,
)

RELEASE = Path(__file__).parent / "fixtures" / "release-0.1.0"


def test_an_artifact_of_release_0_1_0_reads_through_the_typed_records():
    artifact = Artifact.load(RELEASE / "artifact")
    records = read_all(artifact)
    assert set(records) == {"lens", "probe", "profile", "calibrate", "prune", "steer"}
    assert all(VERSION_KEY not in artifact.stages[name] for name in records)  # written before versions: read as 1
    probe = records["probe"]
    # per hidden state, the embedding (depth 0) to the last layer (agreement 1)
    assert isinstance(probe, ProbeRecord) and len(probe.agreement("logit")) == 4 and probe.agreement("logit")[-1] == 1.0
    assert probe.agreement("tuned")
    assert probe.data["spec"].endswith("text.txt")
    profile = records["profile"]
    assert isinstance(profile, ProfileRecord) and len(profile.measured_cost["layers"]) == 3 and profile.pruned is False
    calibration = records["calibrate"]
    assert isinstance(calibration, CalibrateRecord) and calibration.continuations_key
    policy = calibration.policy
    assert isinstance(policy, ExitPolicy) and policy.measure == "softmax" and policy.exit_points
    # release 0.1.0 kept the certificate's fields across the calibration's summary: the record reads them from there
    stored, certificate = artifact.stages["calibrate"], calibration.certificate
    assert (certificate.risk, certificate.target, certificate.epsilon) == (stored["risk"], stored["target"], stored["epsilon"])
    assert certificate.candidates == stored["ltt"]["lambdas"] and certificate.units == stored["ltt"]["n"] > 0
    assert (certificate.prompt_tokens, certificate.new_tokens) == (stored["config"]["prompt_tokens"], stored["generated"]["new_tokens"])
    assert (calibration.corpus.spec, calibration.corpus.seq_len) == (stored["data"]["spec"], stored["data"]["seq_len"])
    assert calibration.predicted_speedup == stored["heldout"]["predicted_speedup"] and calibration.cost_unit == "latency"
    assert isinstance(records["prune"], PruneRecord) and records["prune"].plan["method"] == "threshold"
    steer = records["steer"]
    assert isinstance(steer, SteerRecord) and set(steer.methods) == {"activation"}
    assert steer.applied == {"method": "activation", "alpha": 0.5}
    lens = records["lens"]
    assert isinstance(lens, LensRecord) and lens.window_len and lens.windows
    # What each stage reported beyond the read fields is kept as written; the upgraded record adds its typed fields.
    written = calibration.to_dict()
    assert {k: written[k] for k in stored} == stored and written[VERSION_KEY] == CalibrateRecord.VERSION == 2
    assert CalibrateRecord.from_dict(written) == calibration  # and reads back the same
    tuned = TuneRecord.read(Artifact.load(RELEASE / "tuned"))
    assert tuned.fingerprint and tuned.windows.windows and len(tuned.agreement()) == 4


def test_the_release_artifact_runs_with_its_policy_pruning_and_steering(tmp_path):
    artifact = tmp_path / "artifact"
    shutil.copytree(RELEASE / "artifact", artifact)
    model = save_tiny("llama", tmp_path / "model")  # the same weights: the manifest's content hash matches
    result = CliRunner().invoke(app, ["run", str(artifact), "tok1 tok2 tok3", "--model", str(model), "--raw", "-n", "4", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert 1 <= len(summary["tokens"]) <= 4
    layers = ExitPolicy.from_dict(Artifact.load(artifact).stages["calibrate"]["policy"]).exit_points + [3]
    assert all(t["exit_layer"] in layers for t in summary["tokens"])


def test_a_record_is_written_with_its_version_and_a_newer_one_is_refused(tmp_path):
    artifact = Artifact.load(RELEASE / "artifact")
    ProfileRecord(measured_cost=None, pruned=True, report={"note": "x"}).write(artifact)
    assert artifact.stages["profile"] == {"note": "x", "pruned": True, VERSION_KEY: 1}
    assert ProfileRecord.read(artifact).pruned is True
    artifact.stages["profile"][VERSION_KEY] = 2
    with pytest.raises(DyninferError, match="profile record has version 2, newer than this dyninfer reads"):
        ProfileRecord.read(artifact)
    artifact.stages["profile"] = {"pruned": "yes"}
    with pytest.raises(DyninferError, match=r"profile record is invalid \(pruned is str\)"):
        ProfileRecord.read(artifact)
    artifact.stages["probe"] = ["not", "an", "object"]
    with pytest.raises(DyninferError, match="probe record is invalid"):
        ProbeRecord.read(artifact)
