"""The `dyninfer` command: one module per command, registered here."""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from dyninfer import __version__
from dyninfer.cli import audit as audit_cmd
from dyninfer.cli import bench as bench_cmd
from dyninfer.cli import calibrate as calibrate_cmd
from dyninfer.cli import export as export_cmd
from dyninfer.cli import models as models_cmd
from dyninfer.cli import probe as probe_cmd
from dyninfer.cli import profile as profile_cmd
from dyninfer.cli import prune as prune_cmd
from dyninfer.cli import run as run_cmd
from dyninfer.cli import steer as steer_cmd
from dyninfer.cli import tune as tune_cmd
from dyninfer.cli.output import stderr
from dyninfer.core import distributed

# The click that typer runs on (recent typer vendors its own copy): the base of its usage errors.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class OneLineErrors(TyperGroup):
    """Usage errors (an unknown option, a value that does not parse) as one `error:` line with a hint, exit 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        if not distributed.join().is_main:  # torchrun / accelerate launch: rank 0 alone prints
            _silence()
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except ClickException as exc:
            context = getattr(exc, "ctx", None)
            hint = f" (see `{context.command_path} --help`)" if context is not None else ""
            message = " ".join(exc.format_message().split())
            if message:  # empty: a group called without a command, whose help was just shown
                stderr.print(f"[bold red]error:[/] {message}{hint}", highlight=False, markup=True)
            sys.exit(exc.exit_code)
        finally:
            distributed.leave()
        sys.exit(result if isinstance(result, int) else 0)


def _silence() -> None:
    """Send this process's stdout and stderr to the null device (a data-parallel rank other than 0)."""
    null = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        os.dup2(null, stream.fileno())


app = typer.Typer(
    cls=OneLineErrors,
    name="dyninfer",
    help="Dynamic inference for language models: how much of the model does each token need?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dyninfer {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Exit codes: 0 success, 1 a CI gate failed, 2 bad input or error."""


app.command("probe", help=probe_cmd.HELP)(probe_cmd.probe)
app.command("calibrate", help=calibrate_cmd.HELP)(calibrate_cmd.calibrate)
app.command("prune", help=prune_cmd.HELP)(prune_cmd.prune)
app.add_typer(steer_cmd.app, name="steer", help=steer_cmd.HELP)
app.command("tune-exits", help=tune_cmd.HELP)(tune_cmd.tune_exits)
app.command("export", help=export_cmd.HELP)(export_cmd.export)
app.command("run", help=run_cmd.HELP)(run_cmd.run)
app.command("bench", help=bench_cmd.HELP)(bench_cmd.bench)
app.command("profile", help=profile_cmd.HELP)(profile_cmd.profile)
app.command("audit", help=audit_cmd.HELP)(audit_cmd.audit)
app.command("models", help=models_cmd.HELP)(models_cmd.models)

