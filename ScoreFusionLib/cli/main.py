"""Entry point of the ``scorefusion`` command.

Each sub-command module exposes ``add_parser(subparsers)``, which registers its parser and
sets ``func`` to a callable taking the parsed arguments and returning an exit code.
Library errors become one clear line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import ScoreFusionError
from . import demo_cmd, downstream_cmd, evaluate_cmd, models_cmd, segment_cmd, simulate_cmd, train_cmd, translate_cmd

SUBCOMMANDS = (simulate_cmd, train_cmd, translate_cmd, segment_cmd, evaluate_cmd, downstream_cmd, demo_cmd, models_cmd)

EXIT_USAGE_OR_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scorefusion",
        description="Score-Fusion MRI super-resolution and contrast synthesis.",
    )
    parser.add_argument("--version", action="version", version=f"scorefusion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in provenance (e.g. the training command line)
    try:
        return int(args.func(args) or 0)
    except ScoreFusionError as exc:
        print(f"scorefusion {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE_OR_INPUT
    except KeyboardInterrupt:
        print(f"scorefusion {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
