"""The code's structure as the docs state it: library code spells no CLI flag, CLI defaults are the
library's, and a library error that names a Config field reaches the user as the command's flag."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dyninfer.cli import audit, bench, calibrate, export, probe, profile, prune, run, steer
from dyninfer.cli.app import COMMANDS as COMMAND_TABLE
from dyninfer.cli.app import app, load_command
from dyninfer.jobs import audit as audit_job
from dyninfer.jobs import bench as bench_job
from dyninfer.jobs import calibrate as calibrate_job
from dyninfer.jobs import export as export_job
from dyninfer.jobs import probe as probe_job
from dyninfer.jobs import profile as profile_job
from dyninfer.jobs import prune as prune_job
from dyninfer.jobs import run as run_job
from dyninfer.jobs import steer as steer_job

ROOT = Path(__file__).parents[1]
LIBRARY = ["core", "kernels", "compressors", "early_exit", "runtime", "exporters", "profilers", "jobs"]
COMMANDS = [  # (command function, the Config it builds)
    (probe.probe, probe_job.ProbeConfig),
    (profile.profile, profile_job.ProfileConfig),
    (calibrate.calibrate, calibrate_job.CalibrateConfig),
    (prune.prune, prune_job.PruneConfig),
    (steer.extract, steer_job.ExtractConfig),
    (steer.sweep, steer_job.SweepConfig),
    (export.export, export_job.ExportConfig),
    (run.run, run_job.RunConfig),
    (bench.bench, bench_job.BenchConfig),
    (audit.audit, audit_job.AuditConfig),
]


def _cli_flags() -> set[str]:
    flags, commands = set(), [load_command(name) for name in COMMAND_TABLE]
    while commands:
        command = commands.pop()
        commands.extend(getattr(command, "commands", {}).values())
        for param in command.params:
            flags.update(o for o in [*param.opts, *getattr(param, "secondary_opts", [])] if o.startswith("--"))
    return flags


def test_library_code_spells_no_cli_flag():
    flags = _cli_flags()
    assert {"--out", "--fit-tokens", "--no-baseline", "--sparse-backend"} <= flags  # the collection works
    pattern = re.compile(r"(?<![\w-])(" + "|".join(re.escape(f) for f in sorted(flags, key=len, reverse=True)) + r")(?![\w-])")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for package in LIBRARY
        for path in sorted((ROOT / package).glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert found == []


@pytest.mark.parametrize("command, config_class", COMMANDS, ids=lambda x: getattr(x, "__name__", ""))
def test_cli_defaults_are_the_configs_defaults(command, config_class):
    defaults = {
        f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(config_class)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    # A composed Config (the audit's): its stage Configs' fields are the command's options too, under their own
    # names (the probe's `tokens` is the audit's `probe_tokens`); `prune` and `steer` are the flags that switch
    # a stage on, whose Config the command builds.
    for name, stage in list(defaults.items()):
        if dataclasses.is_dataclass(stage):
            del defaults[name]
            for f in dataclasses.fields(stage):
                defaults.setdefault(f"{name}_{f.name}" if (name, f.name) == ("probe", "tokens") else f.name, getattr(stage, f.name))
    if config_class is audit_job.AuditConfig:
        defaults = {k: v for k, v in defaults.items() if k not in ("prune", "steer")} | {"steer_alphas": ()}
    shared = 0
    for name, parameter in inspect.signature(command).parameters.items():
        if name in defaults and parameter.default is not inspect.Parameter.empty:
            default = parameter.default
            expected = defaults[name]
            if isinstance(default, (list, tuple)) or isinstance(expected, (list, tuple)):
                default, expected = tuple(default or ()), tuple(expected or ())
            assert default == expected, f"{command.__name__} --{name}: {default!r} != {expected!r}"
            shared += 1
    assert shared >= 3  # the command really takes its options from this Config


def test_a_library_error_names_the_commands_flag(tiny_llama_dir, text_file):
    # CalibrateConfig names `fit_tokens`; the CLI shows --fit-tokens, and audit shows its own --tokens for `tokens`.
    result = CliRunner().invoke(
        app,
        [
            "calibrate",
            str(tiny_llama_dir),
            "--data",
            str(text_file),
            "--seq-len",
            "16",
            "--prompt-tokens",
            "8",
            "--lens",
            "logit",
            "--fit-tokens",
            "100000",
        ],
    )
    assert result.exit_code == 2 and "--fit-tokens" in result.stderr and "`" not in result.stderr.split("error:")[1]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["probe", "--bogus"], "No such option: --bogus"),
        (["probe", "--tokens", "many"], "'--tokens'"),
        (["calibrate", "--targets", "0.9,x"], "'--targets': takes comma-separated numbers"),
    ],
)
def test_usage_errors_are_one_error_line(args, fragment):
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0]
    assert "--help" in lines[0]  # the hint


def test_every_benchmark_records_where_its_numbers_come_from():
    """Each script in benchmarks/ writes benchmarks/provenance.py's record (commit, versions, command line)."""
    scripts = [p for p in sorted((ROOT / "benchmarks").glob("*.py")) if p.name != "provenance.py"]
    assert len(scripts) >= 9
    missing = [p.name for p in scripts if not re.search(r"\bprovenance(_line)?\(\)", p.read_text())]
    assert missing == []


# The modules where stored JSON becomes typed records and back (the disk boundary): the records themselves, the
# artifact's and the package's manifest formats, and the model cache's record.
RECORD_BOUNDARY = {
    "core/records.py",
    "core/policies.py",
    "runtime/package_format.py",
    "core/artifacts.py",
    "core/artifact_files.py",
    "core/models.py",
}
# An expression that holds a record, a manifest or a certificate, or a record turned back into a dict.
RECORD_HOLDER = re.compile(r"record|calibration|manifest|certificate|\brule\b|stage|\.report\b|to_dict\(\)")


def _typed_record_keys() -> set[str]:
    """The field names of every typed record, and the keys a version-1 record kept them under."""
    from dyninfer.core import policies, records
    from dyninfer.runtime import package_format

    classes = [
        *records.RECORDS.values(),
        records.ExitCertificate,
        records.CorpusDraw,
        records.StopRule,
        records.StopDraw,
        records.TrainedWindows,
        package_format.PackageManifest,
        package_format.PackageCertificate,
        package_format.PackageStopRule,
        policies.ExitPolicy,
        policies.StopPolicy,
    ]
    return ({f.name for c in classes for f in dataclasses.fields(c)} | {"ltt", "summary", "config", "lambdas"}) - {"report", "path"}


def test_records_are_read_by_attribute_not_by_nested_keys():
    """A stage record, a stop rule, a package manifest or a certificate is read through its typed attributes: the
    dicts it is stored as are parsed at the disk boundary (RECORD_BOUNDARY) and never indexed elsewhere, and no
    record is turned back into a dict to be read (`.report` keeps only what was reported, for reports)."""
    import ast

    keys = _typed_record_keys()
    assert {"threshold", "certificate", "kv_layout", "draw", "candidates"} <= keys  # the collection works
    found = []
    for package in [*LIBRARY, "certification"]:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative in RECORD_BOUNDARY:
                continue
            source = path.read_text()
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Subscript):
                    key, holder = node.slice, node.value
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "setdefault"):
                    key, holder = (node.args or [None])[0], node.func.value
                else:
                    continue
                text = ast.get_source_segment(source, holder) or ""
                keyed = isinstance(key, ast.Constant) and isinstance(key.value, str)
                if text.endswith(".report") or (keyed and key.value in keys and RECORD_HOLDER.search(text)):
                    found.append(f"{relative}:{node.lineno}: {ast.get_source_segment(source, node)}")
    assert found == []


def test_stage_records_are_read_and_written_only_through_core_records():
    """No library module reaches into an artifact's stage dicts by key: core/records.py is the one door."""
    pattern = re.compile(r"\.stages(\.get\(|\[|\.pop\()|\bset_stage\(")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for package in LIBRARY
        for path in sorted((ROOT / package).glob("*.py"))
        if path.relative_to(ROOT).as_posix() not in ("core/artifacts.py", "core/records.py")
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert found == []
