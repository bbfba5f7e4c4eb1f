"""`audit`: one command, a self-contained HTML report with every plot, Markdown, summary.json and gates."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import pytest
from conftest import random_text, save_tiny
from typer.testing import CliRunner

from dyninfer.cli.app import app
from dyninfer.core.artifacts import Artifact
from dyninfer.core.errors import DyninferError

# One xdist worker runs this module: its module fixture is built once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("audit")]

runner = CliRunner()
SMALL = [
    "--seq-len",
    "32",
    "--tokens",
    "256",
    "--calibration-tokens",
    "1024",
    "--heldout-tokens",
    "256",
    "--lens-train-tokens",
    "512",
    "--repeats",
    "3",
    "--targets",
    "0.5,0.9",
    "--target",
    "0.7",
    "--prompts",
    "32",
    "--heldout-prompts",
    "4",
    "--prompt-tokens",
    "12",
    "--new-tokens",
    "6",
]
FIGURES = ("probe", "depth", "curve", "cost")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    model = save_tiny("llama", root / "model")
    data = root / "text.txt"
    data.write_text(random_text(20000))
    return root, model, data


@pytest.fixture(scope="module")
def audited(setup):
    root, model, data = setup
    out = root / "report"
    result = runner.invoke(
        app,
        ["audit", str(model), "--data", str(data), *SMALL, "--out", str(out), "--min-consistency", "0.5", "--min-speedup", "0.5", "--json"],
    )
    return result, out


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures, self.images, self.tables, self.headings, self.external = [], [], 0, [], []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.figures.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "table":
            self.tables += 1
        if tag in ("link", "script") or (tag == "img" and not attrs["src"].startswith("data:")):
            self.external.append(tag)
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


def test_audit_writes_a_self_contained_report_with_every_plot(audited):
    result, out = audited
    assert result.exit_code == 0, result.output
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.figures == [f"figure-{name}" for name in FIGURES]
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert page.external == []  # nothing to fetch: the file stands alone
    assert page.tables >= 4
    for heading in (
        "Summary",
        "CI gates",
        "Exit accuracy per layer (probe)",
        "Prediction depth",
        "Calibrated early exit (speedup vs consistency)",
        "Cost per layer (profile)",
    ):
        assert heading in page.headings


def test_audit_summary_matches_its_stages(audited):
    result, out = audited
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["passed"] is True
    # Headline numbers are the stages' own numbers.
    probe = json.loads((out / "probe" / "summary.json").read_text())
    savings = {lens: v["oracle"]["saving"] for lens, v in probe["lenses"].items()}
    assert set(savings) == {"logit", "tuned"}
    assert summary["headline"]["oracle_flop_saving"] == pytest.approx(max(savings.values()))
    calibrate = json.loads((out / "calibrate" / "summary.json").read_text())
    assert summary["headline"]["consistency"] == pytest.approx(calibrate["generated"]["certified_measure"])
    assert "greedy continuations" in summary["headline"]["consistency_is"]  # says which risk the number is
    assert [t["risk"] for t in summary["targets"]] == ["generation"] * 3
    assert summary["headline"]["speedup_unit"] == "latency"  # the profile's measured cost drove calibration
    assert [t["target"] for t in summary["targets"]] == [0.5, 0.7, 0.9]
    assert [t["kept_in_artifact"] for t in summary["targets"]] == [False, True, False]
    artifact = Artifact.load(out)
    assert {"probe", "profile", "calibrate", "audit"} <= set(artifact.stages)
    assert artifact.stages["calibrate"]["target"] == 0.7
    assert artifact.stages["calibrate"]["cost_model"] == artifact.stages["profile"]["measured_cost"]
    for folder, name in (("probe", "layers.csv"), ("profile", "pieces.csv"), ("calibrate", "curve.png")):
        assert (out / folder / name).is_file()
    gates = {g["name"]: g for g in summary["gates"]}
    assert gates["min-consistency"]["value"] == summary["headline"]["consistency"]
    assert "min-oracle-saving" not in gates  # not set, not checked
    # The plan's expected duration was said before the first stage started, and is kept beside the measured times.
    assert set(summary["expected_timings"]) == {"probe_s", "profile_s", "calibrate_s"}
    assert all(seconds > 0 for seconds in summary["expected_timings"].values())
    said = result.stderr.splitlines()
    plan = next(i for i, line in enumerate(said) if line.startswith("plan: probe about"))
    assert plan < next(i for i, line in enumerate(said) if line.startswith("audit stage 1/3: probe"))


def test_audit_markdown_says_what_the_html_says(audited):
    _, out = audited
    md = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert md.startswith("# dyninfer audit:")
    for heading in ("## Summary", "## CI gates", "## Exit accuracy per layer (probe)", "## Cost per layer (profile)"):
        assert heading in md
    assert f"{summary['headline']['oracle_flop_saving']:.1%} of FLOPs" in md
    assert "| min-consistency | 0.5 |" in md and "| layer 2 |" in md
    assert "GPU: no GPU" in md


def test_a_failed_gate_exits_1_and_still_writes_the_report(setup, tmp_path):
    _, model, data = setup
    out = tmp_path / "gated"
    result = runner.invoke(
        app,
        [
            "audit",
            str(model),
            "--data",
            str(data),
            *SMALL,
            "--lens",
            "logit",
            "--min-oracle-saving",
            "1.0",
            "--min-consistency",
            "0",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 1, result.output
    assert "gate failed: min-oracle-saving" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] is False
    assert [g["passed"] for g in summary["gates"]] == [False, True]
    assert "| min-oracle-saving | 1 |" in (out / "report.md").read_text() and "FAIL" in (out / "report.md").read_text()


def test_audit_extends_an_artifact_with_pruning_and_keeps_foreign_files(setup, tmp_path):
    _, model, data = setup
    out = tmp_path / "art"
    first = runner.invoke(app, ["profile", str(model), "--data", str(data), "--context", "32", "--repeats", "3", "--out", str(out)])
    assert first.exit_code == 0, first.output
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(
        app, ["audit", str(model), "--data", str(data), *SMALL, "--lens", "logit", "--prune", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["prune"]["main"]["achieved_sparsity"] > 0.3
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "prune" / "sweep.png").is_file() and (out / "masks.safetensors").is_file()
    assert "## Pruning" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--min-consistency", "1.5"], "--min-consistency must be between 0 and 1"),
        (["--min-speedup", "0"], "--min-speedup must be positive"),
        (["--targets", "0.9,x"], "'--targets': takes comma-separated numbers"),
        (["--lens", "fancy"], "--lens must be one of logit, tuned"),
        (["--steer", "magic"], "--steer must be one of activation, valve"),
        (["--steer", "valve", "--steer-alphas", "a"], "'--steer-alphas': takes comma-separated numbers"),
        (["--repeats", "1"], "--repeats must be at least 3"),
        (["--prompts", "100000"], "one window per unit"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(setup, tmp_path, args, fragment):
    _, model, data = setup
    out = tmp_path / "never"
    result = runner.invoke(app, ["audit", str(model), "--data", str(data), *SMALL, "--lens", "logit", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.iterdir())  # no report, no temp directory left
    assert "audit stage" not in result.output  # refused before the first stage: no work was done


def test_data_too_short_for_calibration_once_the_lens_trained_is_refused_before_the_probe(setup, tmp_path):
    """The draw calibration makes last is checked first, with the tuned lens's training windows taken out: a prompt
    count that fits the data alone but not beside the lens is refused before any stage runs."""
    from transformers import AutoTokenizer

    from dyninfer.core.data import load_windows
    from dyninfer.jobs import calibrate as calibrate_job
    from dyninfer.jobs.configs import CalibrateConfig

    _, model, data = setup
    windows = load_windows(str(data), AutoTokenizer.from_pretrained(model), seq_len=32, seed=0)
    fit_windows = 1024 // 32  # the audit's calibration fit tokens over the window length
    lens_windows = 4
    prompts = windows.train.shape[0] - fit_windows - lens_windows + 1  # fits alone, not beside the lens
    config = CalibrateConfig(data=str(data), seq_len=32, fit_tokens=1024, prompts=prompts)
    calibrate_job.check_draw(config, windows)  # no lens: it fits
    with pytest.raises(DyninferError, match="one window per unit"):
        calibrate_job.check_draw(config, windows, lens_tokens=lens_windows * 32)
    args = [*SMALL, "--prompts", str(prompts), "--fit-tokens", "1024", "--lens-train-tokens", str(lens_windows * 32)]
    result = runner.invoke(app, ["audit", str(model), "--data", str(data), *args, "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "one window per unit" in result.output and "audit stage" not in result.output


def test_foreign_out_dir_and_other_models_artifact_are_refused_untouched(setup, tmp_path):
    _, model, data = setup
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("keep")
    result = runner.invoke(app, ["audit", str(model), "--data", str(data), *SMALL, "--out", str(busy)])
    assert result.exit_code == 2 and "not a dyninfer artifact" in result.output
    assert [p.name for p in busy.iterdir()] == ["thesis.tex"]

    other = save_tiny("llama", tmp_path / "other", seed=1)
    art = tmp_path / "art"
    made = runner.invoke(app, ["profile", str(other), "--data", str(data), "--repeats", "3", "--context", "32", "--out", str(art)])
    assert made.exit_code == 0
    before = (art / "dyninfer.json").read_text()
    result = runner.invoke(app, ["audit", str(model), "--data", str(data), *SMALL, "--lens", "logit", "--out", str(art)])
    assert result.exit_code == 2 and "was made for model" in result.output
    assert (art / "dyninfer.json").read_text() == before


def test_audit_with_a_steering_check(setup, tmp_path):
    _, model, data = setup
    out = tmp_path / "steered"
    result = runner.invoke(
        app,
        [
            "audit",
            str(model),
            "--data",
            str(data),
            *SMALL,
            "--lens",
            "logit",
            "--steer",
            "activation",
            "--steer-alphas",
            "0.5,1",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    steer = json.loads(result.stdout)["steer"]
    assert [p["alpha"] for p in steer["points"]] == [0.0, 0.5, 1.0] and steer["questions"] == 8
    stage = Artifact.load(out).stages["steer"]
    assert "activation" in stage["methods"] and "activation" in stage["sweeps"]
    assert stage.get("applied") is None  # a check, not a change to the model
    assert (out / "steer" / "sweep-activation" / "sweep.png").is_file()
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.figures == [f"figure-{name}" for name in FIGURES] + ["figure-steer"]
    assert "Steering of chain-of-thought length (activation)" in page.headings


def test_audit_export_is_benchable_as_written(setup, tmp_path):
    """`audit --export` writes the package with optimum's baseline, so `bench --backend onnx` runs on it as is."""
    _, model, data = setup
    out = tmp_path / "exported"
    result = runner.invoke(
        app, ["audit", str(model), "--data", str(data), *SMALL, "--lens", "logit", "--export", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["export"]["baseline"] is not None
    bench = runner.invoke(
        app,
        ["bench", str(out), "--backend", "onnx", "--prompts", "1", "--prompt-tokens", "8", "--new-tokens", "4", "--no-memory", "--json"],
    )
    assert bench.exit_code == 0, bench.output
    modes = [m["mode"] for m in json.loads(bench.stdout)["modes"]]
    assert modes[0] == "transformers (original model)" and {"optimum fp32", "package early-exit"} <= set(modes)


def test_audit_with_a_stop_rule_reports_and_gates_it(setup, tmp_path):
    _, model, data = setup
    out = tmp_path / "stopped"
    args = ["audit", str(model), "--data", str(data), *SMALL, "--lens", "logit", "--stop", "completion", "--out", str(out), "--json"]
    result = runner.invoke(app, [*args, "--min-stop-saving", "0.5"])
    assert result.exit_code in (0, 1), result.output
    summary = json.loads(result.stdout)
    stop = summary["stop"]
    assert stop["policy"]["workload"] == "completion" and stop["policy"]["new_tokens"] == 6  # the calibration's setting
    gate = next(g for g in summary["gates"] if g["name"] == "min-stop-saving")
    assert gate["value"] == stop["heldout"]["tokens_saved"] and gate["passed"] == (gate["value"] >= 0.5)
    assert result.exit_code == (0 if gate["passed"] else 1)
    assert Artifact.load(out).stages["stop"]["rules"]["completion"]["policy"] == stop["policy"]
    assert (out / "stop-completion" / "curve.csv").is_file()
    assert "Stop rule (completion)" in (out / "report.md").read_text()
    refused = runner.invoke(
        app, ["audit", str(model), "--data", str(data), *SMALL, "--min-stop-saving", "0.5", "--out", str(tmp_path / "x")]
    )
    assert refused.exit_code == 2 and "--min-stop-saving gates the stop rule" in refused.output
