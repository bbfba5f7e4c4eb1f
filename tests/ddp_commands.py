"""Several `dyninfer` commands in one data-parallel process group (a test helper).

    python -m torch.distributed.run --nproc-per-node 2 tests/ddp_commands.py OUT_DIR COMMANDS_JSON

COMMANDS_JSON is a list of argument lists. The process group is joined once, then each command
runs in turn as `python -m dyninfer ARGS` would run it under the launcher (rank 0 alone writes
artifacts); rank 0's stdout of command i goes to OUT_DIR/i.out. One launch instead of one per
command: each launch spends most of its time importing torch and transformers.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path


def main() -> None:
    out_dir, commands = Path(sys.argv[1]), json.loads(sys.argv[2])
    from dyninfer.cli.app import app
    from dyninfer.core import distributed

    world = distributed.join()
    try:
        for index, args in enumerate(commands):
            target = out_dir / f"{index}.out" if world.is_main else Path(os.devnull)
            with open(target, "w") as stream, contextlib.redirect_stdout(stream):
                code = app(args=args, prog_name="dyninfer", standalone_mode=False)  # an exit code, or raises
            if code not in (None, 0):
                sys.exit(code)
    finally:
        distributed.leave()


if __name__ == "__main__":
    main()
