"""The ``shardpool`` command line.

Each subcommand is one ``_add_<name>`` function that registers its parser and one ``cmd_<name>``
function that runs it and returns an exit code; :func:`main` only dispatches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from shardpool.config import config_to_dict, config_to_toml, find_config_path, load_config
from shardpool.errors import ConfigError

if TYPE_CHECKING:
    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK = 0
#: Something failed at run time (not the caller's input).
EXIT_FAILURE = 1
#: Bad command line; argparse uses 2 too, so one code means "fix how you called it".
EXIT_USAGE = 2
#: An invalid config file is the caller's input as well, hence the same code as a usage error.
EXIT_CONFIG = EXIT_USAGE


def _print_problems(err: ConfigError, source: str) -> None:
    print(f"shardpool: invalid configuration ({source}):", file=sys.stderr)
    for key, value, allowed in err.problems:
        line = f"{key} = {value!r}: {allowed}" if key else allowed
        print(f"  {line}", file=sys.stderr)


# ------------------------------------------------------------------------------------ check-config


def _add_check_config(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate a config file and print the effective configuration",
        description=(
            "Load PATH (else $SHARDPOOL_CONFIG, else config/shardpool.toml if present, else the "
            "built-in defaults), apply SHARDPOOL_<SECTION>_<KEY> environment overrides, validate, "
            f"and print the result. Exit {EXIT_OK} if valid, {EXIT_CONFIG} with each problem on "
            "stderr if not."
        ),
    )
    p.add_argument("path", nargs="?", metavar="PATH", help="config file (TOML)")
    p.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    p.set_defaults(func=cmd_check_config)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Print the effective config and return EXIT_OK, or the problems and EXIT_CONFIG."""
    path = find_config_path(args.path)
    source = os.fspath(path) if path is not None else "<defaults>"
    try:
        cfg = load_config(path)
    except ConfigError as e:
        _print_problems(e, source)
        return EXIT_CONFIG
    if args.json:
        # default=str: TOML dates/times inside handler_options have no JSON type.
        doc = {"source": cfg.source, **config_to_dict(cfg)}
        print(json.dumps(doc, indent=2, default=str))
    else:
        sys.stdout.write(config_to_toml(cfg))
    return EXIT_OK


# Further subcommands go here, each as one _add_<name>(sub) plus one cmd_<name>(args) -> int,
# registered in _SUBCOMMANDS below: run, bench, status, drain, stop, keys.

_SUBCOMMANDS: tuple[Callable[[_Subparsers], None], ...] = (_add_check_config,)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="shardpool",
        description="Multiprocess sharded worker pool with strict per-channel order.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # argparse exits on --help and on usage errors; callers of main() want a code, not an exit.
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
