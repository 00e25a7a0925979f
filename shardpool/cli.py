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


# ------------------------------------------------------------------------------------------- bench


def _add_bench(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "bench",
        help="load-test an embedded pool with Lightning traffic; check order; compare baselines",
        description=(
            "Run seeded Lightning channel traffic through an embedded pool running the BOLT #2 "
            "state machine, check that no channel saw a message out of order (protocol "
            "violations, sequence gaps, final state = serial replay), and measure throughput "
            "(median of repeats), submit-to-result latency and per-worker balance next to the "
            "naive by-type dispatch, a multiprocessing.Queue-per-worker pool and the bare "
            "pyzmq+cbor2 harness, run interleaved on the same traffic. Progress goes to stderr. "
            f"Exit {EXIT_OK} if the order was kept, {EXIT_FAILURE} if not or if a run failed."
        ),
    )
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes (default: the CPUs available, at most the physical cores)")
    p.add_argument("--messages", type=int, default=200_000, metavar="N",
                   help="messages in the traffic (default: %(default)s)")
    p.add_argument("--channels", type=int, default=2_000, metavar="N",
                   help="channels in the traffic (default: %(default)s)")
    p.add_argument("--peers", type=int, default=None, metavar="N",
                   help="peer connections the channels are spread over (default: channels / 10)")
    p.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="repeats of each throughput run; medians are reported (default: %(default)s)")
    p.add_argument("--cpu-cost-us", type=float, default=0.0, metavar="US",
                   help="CPU microseconds the handler burns per commitment_signed, modelling "
                   "signature checks (default: %(default)s)")
    p.add_argument("--mode", choices=("closed", "open"), default="closed",
                   help="closed: submit as fast as backpressure allows; open: pace the "
                   "Lightning runs at --rate and time every message (default: %(default)s)")
    p.add_argument("--rate", type=float, default=None, metavar="MSGS_PER_S",
                   help="open-loop target rate (default: 20000)")
    p.add_argument("--latency-load", type=float, default=0.3, metavar="FRACTION",
                   help="closed mode: the latency phase runs open-loop at this fraction of the "
                   "measured throughput (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="traffic seed (default: %(default)s)")
    p.add_argument("--bytype-messages", type=int, default=6_000, metavar="N",
                   help="messages run through the by-type dispatch baseline, 0 to skip "
                   "(default: %(default)s)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the trivial-handler, bare pyzmq+cbor2 and mp.Queue runs")
    p.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="messages per frame, pool and bare harness (default: %(default)s)")
    p.add_argument("--max-inflight", type=int, default=16384, metavar="N",
                   help="pool in-flight window per worker (default: %(default)s)")
    p.add_argument("--config", default=None, metavar="PATH",
                   help="pool config file (default: built-in defaults)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="deadline of each single run (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the bench scenario; print the report. EXIT_OK if the order was kept, EXIT_FAILURE if
    shardpool showed a violation or a run failed, EXIT_USAGE for an option out of range."""
    from shardpool.config import physical_cores
    from shardpool.loadtest import BenchOptions, Progress, available_cpus, format_report, run_bench

    workers = args.workers
    if workers is None:
        workers = max(1, min(available_cpus(), physical_cores()))
    opts = BenchOptions(
        workers=workers,
        messages=args.messages,
        channels=args.channels,
        peers=args.peers,
        repeats=args.repeats,
        cpu_cost_us=args.cpu_cost_us,
        mode=args.mode,
        rate=args.rate,
        seed=args.seed,
        baselines=not args.no_baselines,
        bytype_messages=args.bytype_messages,
        latency_load=args.latency_load,
        batch_size=args.batch_size,
        max_inflight=args.max_inflight,
        config=args.config,
        timeout_s=args.timeout,
    )
    try:
        opts.check()
    except ValueError as e:
        print(f"shardpool bench: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = run_bench(opts, Progress(enabled=not args.quiet))
    except ConfigError as e:
        _print_problems(e, args.config or "<defaults>")
        return EXIT_CONFIG
    except Exception as e:  # noqa: BLE001 - any failed run ends the bench with its reason
        print(f"shardpool bench: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return EXIT_OK if report["ok"] else EXIT_FAILURE


# Further subcommands go here, each as one _add_<name>(sub) plus one cmd_<name>(args) -> int,
# registered in _SUBCOMMANDS below: run, bench, status, drain, stop, keys.

_SUBCOMMANDS: tuple[Callable[[_Subparsers], None], ...] = (_add_check_config, _add_bench)


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
