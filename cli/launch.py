"""`python -m dyninfer.cli.launch [torchrun options] COMMAND [options]`: a data-parallel run that exits with the
ranks' own code.

torchrun ends with exit 1 whenever a rank fails, whatever the rank's code: a CI gate cannot tell bad input
(2) or Ctrl-C (130) from a crash. This runs the same launch (torchrun's own parser and agent, the options
torchrun takes) and exits with the code of the rank that failed first (a rank killed by signal N: 128 + N),
without torchrun's failure report: the rank's own `error:` line, printed by rank 0, says what went wrong.

    python -m dyninfer.cli.launch --nproc-per-node 8 probe ./my-model --lens both --out audit/
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from dyninfer.cli.app import COMMANDS


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, the dyninfer command line): the command starts at the first dyninfer command name."""
    for index, argument in enumerate(argv):
        if argument in COMMANDS:
            return argv[:index], argv[index:]
    raise SystemExit(f"usage: python -m dyninfer.cli.launch [torchrun options] COMMAND ... (COMMAND one of {', '.join(COMMANDS)})")


def exit_code(error: ChildFailedError) -> int:
    """The first failed rank's exit code; a rank a signal ended (negative code) as a shell reports it, 128 + N."""
    _, failure = error.get_first_failure()
    code = failure.exitcode
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    launcher, command = split_arguments(list(sys.argv[1:] if argv is None else argv))
    try:
        run(parse_args([*launcher, "-m", "dyninfer", *command]))
    except ChildFailedError as error:
        return exit_code(error)
    except SignalException as error:  # the launcher itself was interrupted: it stopped the ranks
        return 128 + int(error.sigval)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
