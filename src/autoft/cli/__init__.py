"""The ``autoft`` command: parses arguments, sets up logging and shows progress. Nothing else prints.

``search.py`` is the search command; ``using.py`` the commands that use its results; ``output.py`` the console.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
from collections.abc import Sequence

from autoft._started import IMPORT_STARTED
from autoft.cli import search, using
from autoft.cli.output import console, one_line
from autoft.controller import SearchInterrupted
from autoft.errors import AutoftError

__all__ = ["main", "run"]


_COMMANDS = {"search": search.run} | using.COMMANDS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoft", description="AutoML fine-tuning for pretrained models.")
    commands = parser.add_subparsers(dest="command", required=True)
    search.add_parser(commands)
    using.add_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None, *, started_at: float | None = None) -> int:
    """Entry point of the ``autoft`` command; returns the exit code (2 for bad input, 130/143 when interrupted).
    ``started_at`` (``time.time()``): where ``--timeout`` counts from (None: when the search starts)."""
    args = _parser().parse_args(argv)
    args.started_at = started_at
    try:
        return _COMMANDS[args.command](args)
    except AutoftError as exc:
        console.print(f"[bold red]error:[/] {one_line(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except SearchInterrupted as exc:  # the first Ctrl-C / SIGTERM: the search wrote what it had
        if exc.result is not None:
            search.summary(exc.result)
        console.print(f"{exc}: the study keeps every finished trial; run the same command to continue.")
        return exc.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: out at once
        console.print("interrupted: the study keeps every finished trial; run the same command to continue.")
        return 130


def run() -> None:
    """The ``autoft`` console script and ``python -m autoft``: :func:`main`, ``--timeout`` counted from when autoft
    began to load (its imports took 9-10 s on 2 cores), then out without the teardown."""
    _exit_at_once(main(started_at=IMPORT_STARTED))


def _exit_at_once(code: int) -> None:
    """Exit with ``code`` skipping the interpreter's teardown of the objects still alive.

    After a search that teardown freed torch's and the tokenizer's memory object by object, in C (no Python
    frame under faulthandler): 2.5 s after a one-minute MiniLM search and ~9 s between the report and the exit
    of a three-minute one (2 cores), time that ``--timeout`` cannot count and the user waits for. Python's exit
    handlers still run first (logging's flush, Ray's shutdown, temporary folders); with a non-daemon thread
    still running, the normal exit waits.
    """
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter would run first; CPython clears them, so they never run twice
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
