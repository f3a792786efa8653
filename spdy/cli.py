"""The ``spdy`` command: a thin layer over the library API.

Each stage module registers its own subcommand with ``register(subparsers)``;
this file only wires them, sets up logging and is the one error boundary: every
:class:`~spdy.errors.SpdyError` and every ``OSError`` (a file that cannot be read or
written) becomes one line on stderr and exit status 1 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from spdy import __version__
from spdy.errors import SpdyError

log = logging.getLogger("spdy")

# Modules that expose ``register(subparsers) -> None``; each subparser sets ``func(args) -> int``.
COMMAND_MODULES = (
    "spdy.commands.solve",
    "spdy.profilers.cli",
    "spdy.database.cli",
    "spdy.commands.search",
)

EPILOG = """\
examples:
  spdy solve --timings rn50_unstr.txt --speedup 2x
  spdy profile --model minilm --backend spdy-cpu -o profile.json
  spdy database build --model minilm -o db/
  spdy search --model minilm --speedup 2.5x -o out/

Run 'spdy COMMAND --help' for the options and an example of each command.
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps example blocks as written and shows defaults."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spdy",
        description="Prune a neural network to a measured speedup target on this hardware (SPDY).",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"spdy {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that stage is not part of this build
            raise
        mod.register(sub)
    return parser


def _quiet_libraries() -> None:
    """For this command's process: transformers logs errors only and Hugging Face shows no
    progress bars (read by those libraries when they are first imported)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.debug:
        _quiet_libraries()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SpdyError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `spdy solve ... | head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # a file that cannot be read or written
        if args.debug:
            raise
        where = f" {exc.filename!r}" if exc.filename else ""
        print(f"error: cannot access{where}: {exc.strerror or exc}; check the path and its permissions "
              "(--debug shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; completed work is kept and the command resumes where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
