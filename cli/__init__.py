"""The `dyninfer` command (Typer): one module per command, rendering what the jobs return.

`options` declares the shared options once (defaults come from the jobs' Configs); `output`
holds the consoles, progress, JSON output and one-line errors that name the command's flags.
`main` is the console entry point.

May import: every layer.
"""

import os
import signal
import sys


def _interrupted_while_starting(signum, frame) -> None:
    # Nothing has started yet, so there is nothing to clean up; an exception raised inside a C
    # extension's import could come out as a confusing ImportError instead.
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    os._exit(130)


def main() -> None:
    """Run the `dyninfer` command; a Ctrl-C while its libraries load ends it at once (exit 130)."""
    previous = signal.signal(signal.SIGINT, _interrupted_while_starting)
    from dyninfer.cli.app import app  # torch and transformers take seconds to import: under the handler above

    signal.signal(signal.SIGINT, previous)
    app()
