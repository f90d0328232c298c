"""The `attnreg` command line: one parser over the sub-commands of `attnreg.commands`."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from .commands import ablate, app, bench, calibrate, explain, generate, tokens, toy
from .commands.common import Parser, fill_sampler_defaults

COMMANDS = (generate, tokens, calibrate, toy, bench, explain, ablate, app)  # in the order of --help


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="attnreg", description="Attention Regulation for diffusers pipelines")
    parser.add_argument("--version", action="version", version=f"attnreg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv=None) -> int:
    from .regulator import UnsupportedPipelineError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # usage errors (2), --help and --version (0): a code, also when called in-process
        return done.code if isinstance(done.code, int) else 2
    default_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    handler = _show_library_messages()
    try:
        fill_sampler_defaults(args)
        return args.func(args)
    except (ValueError, OSError, UnsupportedPipelineError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"attnreg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = getattr(args, "on_interrupt", "nothing was written")
        print(f"attnreg: interrupted; {kept}", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = default_format
        logging.getLogger("attnreg").removeHandler(handler)


def _show_library_messages() -> logging.Handler:
    """The library logs (targets chosen, a first-use calibration) under "attnreg"; on the command line they
    are one line each on stderr, "attnreg: ..." (warnings: "attnreg: warning: ...")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logger = logging.getLogger("attnreg")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """attnreg's own warnings ("attnreg: ...") as one line on the terminal, without the source line that
    raised them; those of other libraries as Python writes them."""
    text = str(message)
    if text.startswith("attnreg"):
        return text.replace(": ", ": warning: ", 1) + "\n"
    return _PYTHON_FORMAT(message, category, filename, lineno, line)


_PYTHON_FORMAT = warnings.formatwarning


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "warning: " if record.levelno >= logging.WARNING else ""
        return f"attnreg: {level}{record.getMessage()}"


if __name__ == "__main__":
    sys.exit(main())
