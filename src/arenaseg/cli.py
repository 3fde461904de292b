"""Command-line interface: `arenaseg <command> --help` explains every option and its default.

Each command lives in `arenaseg.commands` (its options and its entry point); this module dispatches and turns
users' mistakes into one line and an exit code.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

import torch

from arenaseg.commands import adapt, bench, demo, evaluate, export, phantoms, predict, pretrain
from arenaseg.utils.errors import UserError
from arenaseg.utils.provenance import git_commit

COMMANDS = (pretrain, adapt, predict, evaluate, phantoms, bench, export, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arenaseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


# Options that lower memory, per command, for the out-of-memory message.
MEMORY_HINTS = {
    "adapt": "a smaller --patch (e.g. 64), --patches-per-step 1, a lower --rank, fewer --threads, or --device cpu",
    "pretrain": "a smaller --patch (e.g. 64), --patches-per-step 1, a smaller --feature-size, or fewer --threads",
    "predict": "fewer --threads, or --device cpu",
    "bench": "a smaller --patch (e.g. 64), fewer --workers or --threads, or --device cpu",
    "demo": "fewer --threads",
}


def _terminate(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so that temporary files and folders are removed on the way out."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Users' mistakes (UserError, missing/existing/unwritable paths) print one line and exit 2; out of memory
    says which options lower it (exit 3); Ctrl-C exits 130; anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    git_commit()  # the code this process imports now, whatever the checkout does while it runs
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    prefix = f"arenaseg {args.command}: "
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError) as err:
        print(f"{prefix}error: {err}", file=sys.stderr)
        return 2
    except (torch.OutOfMemoryError, MemoryError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        hint = MEMORY_HINTS.get(args.command, "fewer --threads")
        print(f"{prefix}error: out of memory ({detail}); lower it with {hint}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        resume = " (continue it with --resume)" if args.command in ("adapt", "pretrain") else ""
        print(f"{prefix}interrupted{resume}", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
