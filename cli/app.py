"""The `dyninfer` command: one module per command, loaded only when that command is asked for.

`dyninfer --help` lists the commands from the table below without importing any of them, and
`dyninfer COMMAND --help` imports that command's module alone, which reads its options from the
torch-free Configs (jobs/configs/). A command imports its job (and with it torch and
transformers) when it runs. This is click's lazy-group pattern; the imports it defers are the
CLI's own modules and the jobs below it, so the layer contract is unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import os
import sys

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from dyninfer.cli.output import stderr
from dyninfer.core.version import __version__

# name -> (module in dyninfer.cli, its command: a function or a typer.Typer, the one line `dyninfer --help`
# shows: the first line of the module's HELP, which tests/test_cli.py holds these to).
COMMANDS = {
    "probe": ("probe", "probe", "Per-layer exit accuracy: how early could each token leave the model?"),
    "calibrate": (
        "calibrate",
        "calibrate",
        "Calibrate early-exit thresholds with a statistical guarantee on what runs (CALM, Learn-then-Test).",
    ),
    "stop": (
        "stop",
        "stop",
        "Stop generating what nobody will use: a stop rule for completions or chains of thought, certified by Learn-then-Test.",
    ),
    "prune": ("prune", "prune", "Learn per-token MLP pruning masks and measure what they cost and save."),
    "steer": ("steer", "app", "Find one direction that makes chains of thought shorter or longer, sweep its strength α, bake one α in."),
    "tune-exits": (
        "tune",
        "tune_exits",
        "Teach the model to exit early: a short LoRA fine-tune (LayerSkip, CALM); the full model stays the original.",
    ),
    "export": ("export", "export", "Export the dynamic model as an ONNX Runtime package, exits and custom exit ops included."),
    "run": ("run", "run", "Generate text with the dynamic model of an artifact; each token is coloured by the layer it left at."),
    "bench": ("bench", "bench", "Benchmark the artifact's dynamic model against the full model in one run (batch 1, greedy)."),
    "profile": ("profile", "profile", "Per-layer cost on this machine: parameters, FLOPs, memory, latency, GPU power and energy."),
    "audit": ("audit", "audit", "One-shot model audit: how much could early exit save, what does each layer cost, what can be certified?"),
    "models": ("models", "models", "The model types dyninfer is tested on, and which stages apply to each."),
}

# The click that typer runs on (recent typer vendors its own copy): the base of its usage errors.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def load_command(name: str):
    """The click command `name`, built from its module (imported now)."""
    module_name, attribute, _ = COMMANDS[name]
    module = importlib.import_module(f"dyninfer.cli.{module_name}")
    target = getattr(module, attribute)
    if isinstance(target, typer.Typer):
        command = typer.main.get_command(target)  # a group of subcommands (steer)
    else:
        single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        single.command(name, help=module.HELP)(target)
        command = typer.main.get_command(single)
    command.name = name
    for leaf in _leaves(command):
        leaf.callback = _in_launched_group(leaf.callback)
    return command


def _leaves(command):
    if hasattr(command, "commands"):  # a group (typer runs on its own copy of click: no isinstance check)
        return [leaf for sub in command.commands.values() for leaf in _leaves(sub)]
    return [command]


def _in_launched_group(callback):
    """Run a command inside the process group a launcher (torchrun, accelerate launch) describes: joined once its
    options parsed (never for `--help`), left when it ends; only rank 0 prints."""

    @functools.wraps(callback)
    def run(*args, **kwargs):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return callback(*args, **kwargs)
        from dyninfer.core import distributed  # torch.distributed: only under a launcher, when a command runs

        if distributed.current().size > 1:  # a caller that joined the group itself keeps it
            return callback(*args, **kwargs)
        if not distributed.join().is_main:
            _silence()
        try:
            return callback(*args, **kwargs)
        finally:
            distributed.leave()

    return run


class LazyCommands(TyperGroup):
    """The commands of COMMANDS, each imported when it is run or its help is shown; usage errors (an unknown
    option, a value that does not parse) as one `error:` line with a hint, exit 2."""

    _listing = False  # while the top-level help lists the commands: placeholders that import nothing

    def list_commands(self, ctx) -> list[str]:
        return [*super().list_commands(ctx), *COMMANDS]

    def get_command(self, ctx, name: str):
        if name not in COMMANDS:
            return super().get_command(ctx, name)
        if self._listing:
            return TyperCommand(name, help=COMMANDS[name][2])
        return load_command(name)

    def format_help(self, ctx, formatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except ClickException as exc:
            context = getattr(exc, "ctx", None)
            hint = f" (see `{context.command_path} --help`)" if context is not None else ""
            message = " ".join(exc.format_message().split())
            if message:  # empty: a group called without a command, whose help was just shown
                stderr.print(f"[bold red]error:[/] {escape(message)}{hint}", highlight=False, markup=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            # Every file the library writes maps its failures to a DyninferError; what is left is the command's own
            # output (--json to a full disk, a closed pipe).
            if exc.errno not in _OUTPUT_ERRORS:
                raise
            _silence_stdout()  # so the interpreter's last flush of it does not fail again at exit
            stderr.print(
                f"[bold red]error:[/] cannot write the command's output ({escape(exc.strerror or str(exc))}); "
                "check free space where standard output goes, or write it elsewhere",
                highlight=False,
                markup=True,
            )
            sys.exit(2)
        sys.exit(result if isinstance(result, int) else 0)


_OUTPUT_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EPIPE, errno.EIO, errno.EFBIG)


def _silence_stdout() -> None:
    with contextlib.suppress(OSError, ValueError):  # a stream without a descriptor (an in-memory one) has nothing to flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.stdout = open(os.devnull, "w")  # replaces the broken stream until exit


def _silence() -> None:
    """Send this process's stdout and stderr to the null device (a data-parallel rank other than 0)."""
    null = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        os.dup2(null, stream.fileno())


app = typer.Typer(
    cls=LazyCommands,
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
