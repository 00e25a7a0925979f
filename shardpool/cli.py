"""The ``shardpool`` command line.

Each subcommand is one ``_add_<name>`` function that registers its parser and one ``cmd_<name>``
function that runs it and returns an exit code; :func:`main` only dispatches.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardpool.bench.options import add_arguments as add_bench_arguments
from shardpool.bench.options import from_arguments as bench_options
from shardpool.config import (
    config_to_dict,
    config_to_toml,
    find_config_path,
    load_config,
    load_config_with_origins,
)
from shardpool.errors import ConfigError
from shardpool.exitcodes import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
)

if TYPE_CHECKING:
    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


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
            "apply the rules `shardpool run` applies before it serves (a non-loopback ingress "
            "needs CURVE keys and authorised clients, the control socket stays on this host, ipc "
            "paths fit a unix socket address, the handler imports and builds as a worker does it: "
            "it is imported here, as gunicorn --check-config does), and print the result. "
            f"Exit {EXIT_OK} if `run` would accept it, {EXIT_CONFIG} with each problem (key, "
            "value, what is allowed) on stderr if not."
        ),
    )
    p.add_argument("path", nargs="?", metavar="PATH", help="config file (TOML); or -c PATH")
    _add_config_arg(p)
    _add_override_args(p)
    p.add_argument("--json", action="store_true",
                   help="print JSON instead of TOML (with \"origins\": where each value came from)")
    p.set_defaults(func=cmd_check_config)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Print the effective config and return EXIT_OK, or the problems and EXIT_CONFIG."""
    from shardpool.preflight import check_runnable

    if args.path and args.config and args.path != args.config:
        print("shardpool check-config: give the config file as PATH or as -c PATH, not both",
              file=sys.stderr)
        return EXIT_USAGE
    _cwd_on_import_path()
    path = find_config_path(args.path or args.config)
    source = os.fspath(path) if path is not None else "<defaults>"
    overrides, labels = _overrides(args)
    try:
        cfg, origins = load_config_with_origins(path, overrides=overrides, labels=labels)
        # What `run` would refuse on top: endpoint security, ipc paths, the handler (imported).
        check_runnable(cfg)
    except ConfigError as e:
        _print_problems(e, source)
        return EXIT_CONFIG
    if args.json:
        # default=str: TOML dates/times inside handler_options have no JSON type.
        doc = {"source": cfg.source, **config_to_dict(cfg), "origins": origins}
        print(json.dumps(doc, indent=2, default=str))
    else:
        sys.stdout.write(config_to_toml(cfg, origins))
    return EXIT_OK


# ------------------------------------------------------------- flags shared by run and check-config


def _workers_flag(text: str) -> int | str:
    """``-w N`` or ``-w auto``; the config's own rule checks the range (naming the flag)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a worker count (a whole number, or auto)"
        ) from None


def _add_override_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-w", "--workers", type=_workers_flag, metavar="N",
                   help="worker processes, or auto (physical cores); overrides pool.workers of "
                   "the file and SHARDPOOL_POOL_WORKERS")
    p.add_argument("--handler", metavar="MODULE:ATTR",
                   help="the handler; overrides pool.handler of the file and "
                   "SHARDPOOL_POOL_HANDLER. The current directory is searched first, then the "
                   "installed packages and PYTHONPATH")


_OVERRIDE_FLAGS = (
    ("workers", "pool.workers", "--workers"),
    ("handler", "pool.handler", "--handler"),
    ("connect", "remote.connect", "--connect"),
    ("worker_id", "remote.worker_id", "--id"),
    ("front_key", "remote.front_public_key", "--front-key"),
    ("secret_key", "remote.worker_secret_key", "--secret-key"),
)
"""Each override flag: its ``args`` attribute, the config key, the flag as an error names it."""


def _overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The config overrides the flags give (``{"pool.workers": 4}``) and their labels."""
    overrides: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for attr, key, flag in _OVERRIDE_FLAGS:
        value = getattr(args, attr, None)
        if value is not None:
            overrides[key] = value
            labels[key] = f"flag {flag}"
    return overrides, labels


def _cwd_on_import_path() -> None:
    """Put the current directory first on the import path, as gunicorn and uvicorn do, so that a
    handler module next to the config imports (``python -m`` does this; the ``shardpool`` script
    does not). Workers inherit the path: they are spawned with the front's ``sys.path``."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


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
            "naive by-type dispatch, a multiprocessing.Queue-per-worker pool and the "
            "pyzmq+cbor2 harnesses, run interleaved on the same traffic; then the ceilings "
            "section: each figure as a ratio to its baseline (one-pass ceiling harness, "
            "mp.Queue pool, bare ping-pong, in-process submits) and the recovery after SIGKILL, "
            "with its target (reported, not enforced). Progress goes to stderr. "
            f"Exit {EXIT_OK} if the order was kept, {EXIT_FAILURE} if not or if a run failed."
        ),
    )
    add_bench_arguments(p)
    p.add_argument("--connect", nargs="?", const="", default=None, metavar="ENDPOINT",
                   help="instead of an embedded pool, send the traffic through the ingress of a "
                   "running `shardpool run` (ENDPOINT, or the default config's) and report "
                   "throughput, latency, replies and order; no baselines")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the bench scenario (or, with ``--connect``, the load test through a running backend);
    print the report. EXIT_OK if the order was kept, EXIT_FAILURE if shardpool showed a violation
    or a run failed, EXIT_USAGE for an option out of range, EXIT_CONFIG for a bad pool config."""
    from shardpool.bench.report import Progress

    opts = bench_options(args)
    try:
        opts.check()
    except ValueError as e:
        print(f"shardpool bench: {e}", file=sys.stderr)
        return EXIT_USAGE
    progress = Progress(enabled=not args.quiet)
    try:
        if args.connect is not None:
            from shardpool.bench.remote import format_remote, run_remote

            report = run_remote(args.connect or None, opts, progress)
            text = format_remote(report)
        else:
            from shardpool.bench.report import format_report
            from shardpool.bench.scenario import run_bench

            report = run_bench(opts, progress)
            text = format_report(report)
    except ConfigError as e:
        _print_problems(e, opts.config or "<defaults>")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        # The runs close their pools and reap their processes on the way out.
        print("shardpool bench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - any failed run ends the bench with its reason
        print(f"shardpool bench: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(report, indent=2) if args.json else text)
    return EXIT_OK if report["ok"] else EXIT_FAILURE


# ------------------------------------------------------------------------------ run (node backend)


def _load_for_service(args: argparse.Namespace) -> tuple[Any, str] | int:
    """The config named by ``-c`` (else the default search) with the flags' overrides, or
    EXIT_CONFIG after printing why."""
    path = find_config_path(args.config)
    source = os.fspath(path) if path is not None else "<defaults>"
    overrides, labels = _overrides(args)
    try:
        return load_config(path, overrides=overrides, labels=labels), source
    except ConfigError as e:
        _print_problems(e, source)
        return EXIT_CONFIG


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        help="config file (default: $SHARDPOOL_CONFIG, else config/shardpool.toml if present, "
        "else the built-in defaults)",
    )


def _add_run(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "run",
        help="run the node backend: workers, ingress for producers, control socket, metrics",
        description=(
            "Start the pool, the producer ingress, the control socket (for `shardpool status`, "
            "`drain`, `stop`, `move`, `pin`, `unpin`, `resize`) and, if metrics.enabled, the "
            "Prometheus endpoint; log where they listen; run until SIGTERM/SIGINT, then stop "
            "intake, drain within supervisor.stop_timeout_s and stop (a second signal stops at "
            "once). SIGHUP reloads the config (what can change live is applied, the rest "
            "logged as needing a restart), SIGUSR1 reopens log files, SIGTTIN adds a worker, "
            "SIGTTOU removes one (never below 1). "
            "Flags override the config file and SHARDPOOL_* variables; `shardpool check-config` "
            "with the same -c/-w/--handler shows the result and where each value came from. The "
            "handler is imported with the current directory first on the import path. "
            f"Exit {EXIT_OK} after a clean drain, {EXIT_FAILURE} otherwise, {EXIT_CONFIG} on an "
            "invalid or insecure configuration."
        ),
    )
    _add_config_arg(p)
    _add_override_args(p)
    # Imported here, not with this module: a worker started from `shardpool run` imports its
    # parent's main module again, and the demo package is not the worker's to pay for.
    from shardpool.demo.load import DEMO_DEFAULT_RATE

    p.add_argument(
        "--demo-load",
        nargs="?",
        type=float,
        const=DEMO_DEFAULT_RATE,
        metavar="RATE",
        help="also drive the built-in Lightning traffic generator through the ingress, at RATE "
        f"messages/s (default {DEMO_DEFAULT_RATE:g}; 0 = as fast as the pool takes them)",
    )
    _add_log_args(p)
    p.set_defaults(func=cmd_run)


def _add_log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level on stderr (default INFO)",
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="log lines on stderr as text (default) or json: one object per line with the keys "
        "ts (ISO 8601 UTC), level, logger, message, pid, exc (the traceback, when there is one) "
        "and any extra fields of the log call; every stderr line is then JSON",
    )


def cmd_run(args: argparse.Namespace) -> int:
    """Run the backend until signalled; the exit code says whether it drained cleanly."""
    from shardpool.logformat import configure_logging

    restore = configure_logging(args.log_level, args.log_format)
    try:
        return _run_backend(args)
    finally:
        restore()


def _run_backend(args: argparse.Namespace) -> int:
    import zmq

    from shardpool.errors import ShardPoolError, WorkerStartError
    from shardpool.service import Service

    loaded = _load_for_service(args)
    if isinstance(loaded, int):
        return loaded
    cfg, source = loaded
    if args.demo_load is not None and args.demo_load < 0:
        print("shardpool run: --demo-load RATE must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    _cwd_on_import_path()
    # This process is ours: let the threads that move messages (ingress, the front's I/O thread)
    # take the GIL within 0.5 ms instead of Python's 5 ms default. Measured with a busy
    # producer thread next to the front: submit-to-result p50 9 ms -> 1.9 ms.
    sys.setswitchinterval(0.0005)
    path = find_config_path(args.config)
    overrides, labels = _overrides(args)

    def reload() -> Any:
        # SIGHUP reads the same file and environment again, with the same flags on top.
        return load_config(path, overrides=overrides, labels=labels)

    service = Service(cfg, demo_load=args.demo_load, reload=reload)
    try:
        service.start()
    except ConfigError as e:
        _print_problems(e, source)
        return EXIT_CONFIG
    except (ShardPoolError, OSError, zmq.ZMQError) as e:
        print(f"shardpool run: cannot start: {e}", file=sys.stderr)
        if isinstance(e, WorkerStartError) and "ModuleNotFoundError" in str(e):
            from shardpool.preflight import IMPORT_HINT

            print(f"  pool.handler = {cfg.pool.handler!r}: {IMPORT_HINT}", file=sys.stderr)
        return EXIT_FAILURE
    return service.serve()


# --------------------------------------------------------------------------- status, drain, stop


def _add_endpoint_args(p: argparse.ArgumentParser, timeout: float) -> None:
    _add_config_arg(p)
    p.add_argument(
        "--endpoint",
        metavar="ENDPOINT",
        help="control endpoint of the backend (default: the one its config names)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        metavar="SECONDS",
        help=f"how long to wait for the backend's answer (default {timeout:g})",
    )


def _control_endpoint(args: argparse.Namespace) -> str | int:
    if args.endpoint:
        return str(args.endpoint)
    loaded = _load_for_service(args)
    if isinstance(loaded, int):
        return loaded
    from shardpool.security import resolve_endpoints

    return resolve_endpoints(loaded[0])[1]


def _add_status(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "status",
        help="live table of a running backend's workers (like top)",
        description=(
            "Show a running `shardpool run`: per-worker pid, state, epoch/restarts, channels, "
            "queue depth, in-flight, processed/s, failures, redeliveries, event-loop lag, CPU and "
            "RSS, a row for the front process, plus order-violation counters, ingress figures, "
            "halted and the hottest channels. On a terminal: a live view on the alternate screen, "
            "refreshed every --interval seconds until q or Ctrl-C, fitted to the terminal's width "
            "(least important columns dropped first), in colour unless NO_COLOR is set. Prints "
            "once with --once/--json; a pipe gets whole lines. "
            "With no flags it finds a backend started with no flags."
        ),
    )
    _add_endpoint_args(p, timeout=5.0)
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.add_argument("--json", action="store_true", help="print one JSON snapshot and exit")
    p.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS", help="refresh period (default 1)"
    )
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the status table (live, once, or as JSON). Exit 1 if no backend answers.

    On a terminal the live table uses the alternate screen (left again on exit, Ctrl-C or
    error), fits the terminal's width and height, and quits on ``q``; colour unless
    ``NO_COLOR`` is set. A pipe or a file gets whole lines, no colour, a table per interval.
    """
    import time

    from shardpool.control import ControlClient
    from shardpool.errors import ShardPoolError
    from shardpool.status import render_status

    endpoint = _control_endpoint(args)
    if isinstance(endpoint, int):
        return endpoint
    try:
        with ControlClient(endpoint, timeout=args.timeout) as client:
            if args.json:
                print(json.dumps(client.request("status"), indent=2, default=str))
                return EXIT_OK
            tty = sys.stdout.isatty()
            colour = tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
            if args.once:
                # A terminal gets lines fitted to its width; a pipe or a file gets them whole.
                width = shutil.get_terminal_size().columns if tty else None
                print(render_status(client.request("status"), width, colour))
                return EXIT_OK
            if tty:
                return _live_status(lambda w: render_status(client.request("status"), w, colour),
                                    args.interval)
            while True:
                print(render_status(client.request("status")) + "\n", flush=True)
                time.sleep(max(0.1, args.interval))
    except KeyboardInterrupt:
        return EXIT_OK
    except ShardPoolError as e:
        print(f"shardpool status: {e}", file=sys.stderr)
        return EXIT_FAILURE


_ALT_SCREEN_ON = "\x1b[?1049h\x1b[?25l"  # alternate screen, cursor hidden
_ALT_SCREEN_OFF = "\x1b[?25h\x1b[?1049l"


def _live_status(render: Callable[[int], str], interval: float) -> int:
    """Redraw ``render(width)`` every ``interval`` seconds on the alternate screen until ``q``
    (or Ctrl-C); the terminal is restored however this ends. Keys are read from stdin in
    cbreak mode when it is a terminal, waiting with select until the interval is over (in
    0.1 s slices: a resized terminal is redrawn at once)."""
    import termios
    import tty

    keys = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(keys) if keys is not None else None
    out = sys.stdout
    out.write(_ALT_SCREEN_ON)
    out.flush()
    try:
        if keys is not None:
            tty.setcbreak(keys)  # keys one at a time, no echo; Ctrl-C still interrupts
        while True:
            size = shutil.get_terminal_size()
            lines = render(size.columns).split("\n")
            footer = f"q quits; every {interval:g} s"
            if len(lines) >= size.lines:  # the screen's height: the rest is cut, said so
                lines = lines[: max(0, size.lines - 2)]
                footer = "… more below (a taller terminal, or --once) · " + footer
            lines.append(footer[: size.columns])
            # Home + clear-to-end-of-line per line redraws in place without a full clear.
            out.write("\x1b[H" + "\x1b[K\n".join(lines) + "\x1b[K\x1b[J")
            out.flush()
            if _quit_pressed(keys, max(0.1, interval), size):
                return EXIT_OK
    finally:
        if keys is not None and saved is not None:
            termios.tcsetattr(keys, termios.TCSADRAIN, saved)
        out.write(_ALT_SCREEN_OFF)
        out.flush()


def _quit_pressed(keys: int | None, timeout: float, size: os.terminal_size) -> bool:
    """Wait up to ``timeout`` seconds for a key on ``keys``; True if ``q`` (or ``Q``) came.
    Returns False early when the terminal's size is no longer ``size`` (redraw at once)."""
    import select
    import time

    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if shutil.get_terminal_size() != size:
            return False
        if keys is None:
            time.sleep(min(left, 0.1))
            continue
        ready, _, _ = select.select([keys], [], [], min(left, 0.1))
        if ready:
            data = os.read(keys, 64)
            if not data or b"q" in data.lower():  # end of input: nothing more to wait for
                return True
    return False


def _control_request(
    args: argparse.Namespace, op: str, payload: dict[str, Any] | None = None,
    timeout: float | None = None, client_timeout: float = 5.0, note: str = "",
) -> Any:
    """One request to the backend's control socket; the reply, or an exit code (int) after
    printing why: EXIT_USAGE when the backend found the request itself wrong (a slot, worker or
    channel that does not exist), EXIT_FAILURE when no backend answered or it could not do it.
    ``note`` is added to an error the backend answered."""
    from shardpool.control import BadRequest, ControlClient, ControlError
    from shardpool.errors import ShardPoolError

    endpoint = _control_endpoint(args)
    if isinstance(endpoint, int):
        return endpoint
    try:
        with ControlClient(endpoint, timeout=client_timeout) as client:
            return client.request(op, payload, timeout=timeout)
    except BadRequest as e:
        print(f"shardpool {args.command}: {e}{note}", file=sys.stderr)
        return EXIT_USAGE
    except ShardPoolError as e:
        # The note explains an id in the backend's answer; "no backend" needs none.
        print(f"shardpool {args.command}: {e}{note if isinstance(e, ControlError) else ''}",
              file=sys.stderr)
        return EXIT_FAILURE


def _add_drain(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "drain",
        help="stop intake and wait until every accepted message is finished",
        description=(
            "Ask a running backend to stop accepting messages (producers get 'draining' "
            "rejections) and to finish everything it accepted. The backend stays up (status "
            "keeps working) until `shardpool stop`, or until `shardpool undrain` reopens "
            "intake. Exit 0 once drained, 1 if the deadline passed first or no backend answers."
        ),
    )
    _add_endpoint_args(p, timeout=30.0)
    p.set_defaults(func=cmd_drain)


def cmd_drain(args: argparse.Namespace) -> int:
    """Drain through the control socket; print the outcome."""
    # The backend's own deadline is ours; a little slack so its answer still arrives.
    reply = _control_request(args, "drain", {"timeout": args.timeout}, timeout=args.timeout + 5.0)
    if isinstance(reply, int):
        return reply
    if reply.get("drained"):
        print("drained: every accepted message is finished; intake is closed")
        return EXIT_OK
    print(f"not drained: {reply.get('pending')} messages still in flight after {args.timeout:g} s")
    return EXIT_FAILURE


def _add_undrain(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "undrain",
        help="reopen intake after `shardpool drain` (the backend accepts messages again)",
        description=(
            "Undo `shardpool drain` without a restart: the ingress accepts messages again "
            "(producers no longer get 'draining' rejections), the demo load (--demo-load) starts "
            "again on fresh channels, and status shows state 'running', intake 'open'. A drain "
            "still waiting is called off (that `shardpool drain` exits 1 saying so). Harmless "
            "when intake is open already. Exit 0 once intake is open, 1 if the backend is "
            "shutting down or no backend answers."
        ),
    )
    _add_endpoint_args(p, timeout=10.0)
    p.set_defaults(func=cmd_undrain)


def cmd_undrain(args: argparse.Namespace) -> int:
    """Reopen intake through the control socket; print what changed."""
    reply = _control_request(args, "undrain", timeout=args.timeout,
                             client_timeout=min(args.timeout, 10.0))
    if isinstance(reply, int):
        return reply
    if reply.get("was") in ("draining", "drained"):
        print(f"intake reopened (was {reply['was']}): the backend accepts messages again")
    else:
        print("intake was open already: the backend accepts messages")
    return EXIT_OK


def _add_stop(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "stop",
        help="shut a running backend down (as SIGTERM does), wait, exit with its exit code",
        description=(
            "Ask a running backend to stop intake, drain and exit, and wait (--timeout seconds) "
            "until its process is gone. Exits with the backend's own exit code: 0 after a clean "
            "drain, 1 otherwise (messages unfinished or in doubt, a forced stop, a broken pool); "
            "1 too when no backend answers or it is still running at the deadline. With "
            "--no-wait: 0 once the backend has agreed to stop."
        ),
    )
    _add_endpoint_args(p, timeout=60.0)
    p.add_argument("--no-wait", action="store_true", help="return once the backend has agreed")
    p.set_defaults(func=cmd_stop)


def _wait_gone(pid: int, deadline: float) -> bool:
    """Watch process ``pid`` until it is gone (True) or ``deadline`` (monotonic) passes
    (False). It is not our child, so there is nothing to wait() on; a zombie is gone too: it has
    exited and only waits for its own parent to collect it."""
    import time

    import psutil

    try:
        proc = psutil.Process(pid)
        while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)  # sleep-ok - polling a process that is not ours, under a deadline
    except psutil.NoSuchProcess:
        pass
    return True


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop through the control socket, wait for the backend's exit code and for its process
    to end; exit with that code."""
    import time

    from shardpool.errors import NotRunning

    if args.no_wait:
        reply = _control_request(args, "stop", client_timeout=min(args.timeout, 10.0))
        if isinstance(reply, int):
            return reply
        print(f"stopping backend pid {int(reply['pid'])}")
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    endpoint = _control_endpoint(args)
    if isinstance(endpoint, int):
        return endpoint
    from shardpool.control import ControlClient, ControlError

    try:
        with ControlClient(endpoint, timeout=min(args.timeout, 10.0)) as client:
            pid = int(client.request("ping")["pid"])
            print(f"stopping backend pid {pid}", flush=True)
            # Answered once the backend has drained and knows its exit code (just before it
            # closes the control socket).
            reply = client.request("stop", {"wait": True}, timeout=args.timeout)
    except NotRunning as e:
        if "pid" not in locals():
            print(f"shardpool stop: {e}", file=sys.stderr)
            return EXIT_FAILURE
        if time.monotonic() >= deadline:
            print(f"shardpool stop: pid {pid} still running after {args.timeout:g} s",
                  file=sys.stderr)
        else:
            print(f"shardpool stop: backend pid {pid} ended without reporting its exit code "
                  f"({e})", file=sys.stderr)
        return EXIT_FAILURE
    except ControlError as e:
        print(f"shardpool stop: {e}", file=sys.stderr)
        return EXIT_FAILURE
    # A backend without the exit-code answer (an older version) answers at once: code unknown.
    code = reply.get("exit_code")
    if not _wait_gone(pid, deadline):
        print(f"shardpool stop: pid {pid} still running after {args.timeout:g} s",
              file=sys.stderr)
        return EXIT_FAILURE
    if code is None:
        print(f"backend pid {pid} stopped")
        return EXIT_OK
    if code == EXIT_OK:
        print(f"backend pid {pid} stopped: clean drain, exit code {code}")
    else:
        print(f"backend pid {pid} stopped with exit code {code}: not a clean drain (messages "
              "unfinished or in doubt, a forced stop, or a broken pool: see its log)")
    return int(code)


# -------------------------------------------------------------------------------------------- keys


def _add_keys(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "keys",
        help="generate CURVE keys for a tcp ingress (a server and a client keypair), or for "
        "remote workers (--worker)",
        description=(
            "Write DIR/server.key, DIR/server.key_secret, DIR/client.key, DIR/client.key_secret "
            "and DIR/authorized_clients/client.key (DIR is created with mode 0700, secret files "
            "0600), and print the [ingress] settings that use them."
        ),
    )
    p.add_argument("directory", metavar="DIR", help="directory for the key files")
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.add_argument(
        "--worker",
        metavar="ID",
        action="append",
        help="instead: a keypair for the remote worker ID (DIR/ID.key, DIR/ID.key_secret), its "
        "public key pinned for the front (DIR/workers/ID.key), and the front's keypair for its "
        "workers (DIR/front.key, DIR/front.key_secret) unless DIR has one; repeat for more "
        "workers",
    )
    p.set_defaults(func=cmd_keys)


def cmd_keys(args: argparse.Namespace) -> int:
    """Generate the keypairs; print where they are and how to configure them."""
    from pathlib import Path

    from shardpool.errors import ShardPoolError
    from shardpool.security import generate_keys

    if args.worker:
        return _worker_keys(Path(args.directory).absolute(), args.worker, args.force)
    try:
        files = generate_keys(Path(args.directory).absolute(), force=args.force)
    except (OSError, ShardPoolError) as e:
        print(f"shardpool keys: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"wrote {files.server_public}, {files.server_secret}, {files.client_public}, "
        f"{files.client_secret}, {files.clients_dir}/client.key\n\n"
        "# backend config:\n[ingress]\n"
        f'curve_public_key = "{files.server_public}"\n'
        f'curve_secret_key = "{files.server_secret}"\n'
        f'curve_clients_dir = "{files.clients_dir}"\n\n'
        "# producer (copy client.key_secret and server.key to its host):\n"
        f'#   Client(endpoint, server_public_key="{files.server_public}", '
        f'client_secret_key="{files.client_secret}")'
    )
    return EXIT_OK


def _worker_keys(directory: Any, ids: list[str], force: bool) -> int:
    """``shardpool keys --worker ID ... DIR``: the keys of remote workers and their front."""
    from shardpool.errors import ShardPoolError
    from shardpool.security import generate_worker_keys

    try:
        made = [generate_worker_keys(directory, wid, force=force) for wid in ids]
    except (OSError, ValueError, ShardPoolError) as e:
        print(f"shardpool keys: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, ValueError) else EXIT_FAILURE
    first = made[0]
    workers = ", ".join(f'"{wid}" = 1.0' for wid in ids)
    print("wrote " + ", ".join(f"{m.public}, {m.secret}, {m.pinned}" for m in made))
    if any(m.front_created for m in made):
        print(f"wrote the front's keypair {first.front_public}, {first.front_secret}")
    print(
        "\n# front config (keep front.key_secret and workers/ on the front host):\n[remote]\n"
        'bind = "tcp://FRONT-ADDRESS:5557"\n'
        f"workers = {{ {workers} }}\n"
        f'curve_public_key = "{first.front_public}"\n'
        f'curve_secret_key = "{first.front_secret}"\n'
        f'workers_dir = "{first.pinned.parent}"\n\n'
        "# each worker host gets its ID.key_secret and front.key (then delete the secret here):"
    )
    for wid, m in zip(ids, made, strict=True):
        print(f"#   shardpool worker --connect tcp://FRONT-ADDRESS:5557 --id {wid} "
              f"--front-key front.key --secret-key {m.secret.name}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ worker


def _add_worker(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "worker",
        help="run a worker on this host for a front on another host (tcp, CURVE)",
        description=(
            "Connect to the front at --connect (remote.connect), introduce this worker as --id "
            "(remote.worker_id; the front pins its public key), and serve the channels the front "
            "gives it, strictly in order, exactly as a local worker; the handler and its "
            "settings come from the front. If it hears nothing from the front for "
            "remote.lease_s (the front's value) it stops taking messages and joins again as an "
            "empty worker. Runs until SIGTERM/SIGINT (it finishes the call in progress, "
            f"acknowledges, exits {EXIT_OK}). Exit {EXIT_CONFIG}: a bad config, or the front "
            "refused this worker for good (unknown id, wrong key, another wire version); "
            "3: the handler could not start. Meant to run under the host's service manager: "
            "see config/systemd/shardpool-worker@.service."
        ),
    )
    _add_config_arg(p)
    p.add_argument("--connect", metavar="tcp://HOST:PORT",
                   help="the front's remote.bind address; overrides remote.connect")
    p.add_argument("--id", dest="worker_id", metavar="ID",
                   help="this worker's id, as listed in the front's remote.workers; overrides "
                   "remote.worker_id")
    p.add_argument("--front-key", dest="front_key", metavar="FILE",
                   help="the front's CURVE public key file; overrides remote.front_public_key")
    p.add_argument("--secret-key", dest="secret_key", metavar="FILE",
                   help="this worker's CURVE secret key file (e.g. from systemd's "
                   "LoadCredential); overrides remote.worker_secret_key")
    _add_log_args(p)
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    """Serve a front on another host until signalled."""
    from shardpool.logformat import configure_logging
    from shardpool.worker.remote import options_from_config, run_remote_worker

    restore = configure_logging(args.log_level, args.log_format)
    try:
        loaded = _load_for_service(args)
        if isinstance(loaded, int):
            return loaded
        cfg, source = loaded
        try:
            opts = options_from_config(cfg)
        except ConfigError as e:
            _print_problems(e, source)
            return EXIT_CONFIG
        _cwd_on_import_path()
        return run_remote_worker(opts)
    finally:
        restore()


# Further subcommands go here, each as one _add_<name>(sub) plus one cmd_<name>(args) -> int,
def _add_resume(sub: _Subparsers) -> None:
    _add_channel_decision(sub, "resume", "retry the failed message of a halted channel, then go on")


def _add_skip(sub: _Subparsers) -> None:
    _add_channel_decision(
        sub, "skip", "record the failed message of a halted channel as skipped, then go on"
    )


def _add_channel_decision(sub: _Subparsers, name: str, what: str) -> None:
    p = sub.add_parser(
        name,
        help=what,
        description=(
            f"Operator decision for a channel halted by the 'halt' failure policy: {what}. "
            "Halted channels are listed by `shardpool status`, each id in a form CHANNEL "
            f"accepts. Exit {EXIT_OK} when applied, {EXIT_USAGE} for a channel id in none of the "
            f"accepted forms, {EXIT_FAILURE} when the channel is not halted or no backend answers."
        ),
    )
    p.add_argument("channel", type=_channel, metavar="CHANNEL", help=_CHANNEL_HELP)
    _add_endpoint_args(p, timeout=10.0)
    p.set_defaults(func=cmd_channel_decision, op=name)


def cmd_channel_decision(args: argparse.Namespace) -> int:
    """``resume`` / ``skip`` through the control socket."""
    from shardpool.channelid import format_channel

    cid: bytes = args.channel
    reply = _control_request(args, args.op, {"channel": cid.hex()},
                             client_timeout=args.timeout, note=_channel_note(cid))
    if isinstance(reply, int):
        return reply
    print(f"{args.op}: channel {format_channel(cid)}")
    return EXIT_OK


# -------------------------------------------------------------------------------- dead letters


def _add_dead_letters(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "dead-letters",
        help="list, replay or purge the messages the skip policy (or an operator) dropped",
        description=(
            "The dead-letter store of a running backend (on with deadletters.enabled): every "
            "message that ended failed under the 'skip' policy or skipped by an operator, with "
            "its payload and error."
        ),
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser(
        "list", help="the stored entries, oldest first",
        description=f"The stored entries, oldest first. Exit {EXIT_OK}, or {EXIT_FAILURE} when "
                    "no backend answers or dead letters are off.",
    )
    ls.add_argument("--channel", type=_channel, metavar="CHANNEL", help=_CHANNEL_HELP)
    ls.add_argument("--limit", type=int, default=0, metavar="N", help="at most N entries")
    ls.add_argument("--json", action="store_true", help="the backend's answer as JSON")
    rp = actions.add_parser(
        "replay", help="submit stored messages again, in order; remove those answered ok",
        description=(
            "Submit the stored messages again (all, one channel's, or the given ids) in id "
            "order, so each channel's in their original order; each answered ok is removed, "
            "each that fails again stays with the new error. Exit "
            f"{EXIT_OK} when every one was answered ok, {EXIT_FAILURE} otherwise."
        ),
    )
    rp.add_argument("--channel", type=_channel, metavar="CHANNEL", help=_CHANNEL_HELP)
    rp.add_argument("--id", type=int, nargs="+", dest="ids", metavar="N", help="these entries")
    pg = actions.add_parser(
        "purge", help="delete stored entries",
        description="Delete one channel's entries (--channel) or every one (--all).",
    )
    which = pg.add_mutually_exclusive_group(required=True)
    which.add_argument("--channel", type=_channel, metavar="CHANNEL", help=_CHANNEL_HELP)
    which.add_argument("--all", action="store_true", help="every entry")
    for q in (ls, rp, pg):
        _add_endpoint_args(q, timeout=60.0 if q is rp else 10.0)
    p.set_defaults(func=cmd_dead_letters)


def cmd_dead_letters(args: argparse.Namespace) -> int:
    """``dead-letters list|replay|purge`` through the control socket."""
    payload: dict[str, Any] = {"action": args.action}
    if args.channel is not None:
        payload["channel"] = args.channel.hex()
    if args.action == "list":
        payload["limit"] = max(0, args.limit)
    elif args.action == "replay":
        payload["timeout"] = args.timeout
        if args.ids:
            payload["ids"] = args.ids
    else:
        payload["all"] = bool(args.all)
    reply = _control_request(args, "dead-letters", payload, client_timeout=args.timeout + 5.0)
    if isinstance(reply, int):
        return reply
    if args.action == "list":
        print(json.dumps(reply, indent=2) if args.json else _dead_letter_table(reply))
        return EXIT_OK
    if args.action == "purge":
        print(f"purged {reply['purged']} entries")
        return EXIT_OK
    print(f"replayed {reply['replayed']} of {reply['submitted']}: {reply['failed']} failed again, "
          f"{reply['pending']} unanswered in time")
    for err in reply["errors"]:
        print(f"  id {err['id']}: {err['error']}")
    return EXIT_OK if reply["replayed"] == reply["submitted"] else EXIT_FAILURE


def _dead_letter_table(reply: dict[str, Any]) -> str:
    import datetime

    from shardpool.channelid import format_channel_hex

    lines = [f"{reply['count']} dead letters in {reply['path']} ({reply['dropped']} dropped "
             f"to the bound, {reply['write_errors']} write errors)"]
    if reply["entries"]:
        lines.append(f"{'ID':>6}  {'TIME (UTC)':19}  {'SEQ':>6}  {'ACTION':7}  CHANNEL  ERROR")
    for e in reply["entries"]:
        when = datetime.datetime.fromtimestamp(e["time"], datetime.UTC)
        lines.append(
            f"{e['id']:>6}  {when:%Y-%m-%d %H:%M:%S}  {e['seq']:>6}  {e['action']:7}  "
            f"{format_channel_hex(e['channel'])}  {e['error_type']}: {e['error']}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------- move, pin, unpin, resize


def _slot_list(text: str) -> list[int]:
    """``5``, ``5,9`` or ``12-15`` (or a mix) as a list of slots; argparse reports a bad one."""
    slots: list[int] = []
    try:
        for part in text.split(","):
            lo, dash, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if dash else int(lo)
            if first < 0 or last < first:
                raise ValueError
            slots.extend(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a slot number (or a list such as 5,9,12-15)"
        ) from None
    return slots


def _worker_index(text: str) -> int:
    try:
        worker = int(text)
    except ValueError:
        worker = -1
    if worker < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a worker index (0, 1, ...)")
    return worker


def _worker_count(text: str) -> int:
    try:
        workers = int(text)
    except ValueError:
        workers = 0
    if workers < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a worker count (1 or more)")
    return workers


def _channel(text: str) -> bytes:
    """A channel id as an operator gives it: ``hex:…``, ``text:…`` or bare (hex if it is an even
    number of hex digits, else text); argparse reports a bad one with the accepted forms."""
    from shardpool.channelid import parse_channel

    try:
        return parse_channel(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_CHANNEL_HELP = (
    "the channel id, as `shardpool status` prints it: hex:HEX or text:TEXT, or bare: hex if it "
    "is an even number of hex digits (6368616e2d31), else text (chan-1); a text id that is "
    "valid hex needs text: (text:cafe)"
)


def _channel_note(cid: bytes) -> str:
    """What to add to a backend's error about ``cid`` (it names ids in hex) when the operator
    gave it in another form."""
    from shardpool.channelid import format_channel

    shown = format_channel(cid)
    return "" if shown == cid.hex() else f" ({shown} is {cid.hex()} in hex)"


def _add_placement_args(p: argparse.ArgumentParser, timeout: float) -> None:
    _add_endpoint_args(p, timeout=timeout)
    p.add_argument("--json", action="store_true", help="print the backend's answer as JSON")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _add_move(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "move",
        help="move routing slots to another worker while running",
        description=(
            "Move SLOT (or several: 5,9,12-15; all owned by one worker) of a running backend to "
            "WORKER: their channels' new messages wait at the front while the old worker "
            "finishes what it has, then their state moves and they go on at WORKER, in order. "
            "`shardpool status` shows the slots per worker and the moves. "
            f"Exit {EXIT_OK} once committed, {EXIT_USAGE} for a slot or worker that does not "
            f"exist, {EXIT_FAILURE} if the move was refused, called off, not done within "
            "--timeout, or no backend answers."
        ),
    )
    p.add_argument("slots", type=_slot_list, metavar="SLOT", help="slot number(s)")
    p.add_argument("worker", type=_worker_index, metavar="WORKER", help="the worker to move to")
    _add_placement_args(p, timeout=30.0)
    p.set_defaults(func=cmd_move)


def cmd_move(args: argparse.Namespace) -> int:
    """``move`` through the control socket."""
    reply = _control_request(
        args, "move", {"slots": args.slots, "worker": args.worker, "timeout": args.timeout},
        timeout=args.timeout + 5.0, client_timeout=args.timeout + 5.0,
    )
    if isinstance(reply, int):
        return reply
    committed = reply["state"] == "committed"
    if args.json:
        print(json.dumps(reply, indent=2))
        return EXIT_OK if committed else EXIT_FAILURE
    slots = reply["slots"]
    what = f"slot {slots[0]}" if len(slots) == 1 else f"{len(slots)} slots"
    if not committed:
        print(
            f"move {reply['gen']} of {what} (worker {reply['src']} → {reply['dst']}) not done "
            f"within {args.timeout:g} s: {reply['state']}"
        )
        return EXIT_FAILURE
    print(
        f"moved {what} from worker {reply['src']} to worker {reply['dst']} "
        f"(move {reply['gen']}, messages held {_ms(reply['pause_s'])})"
    )
    return EXIT_OK


def _add_pin(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "pin",
        help="place one channel on a worker of its own choosing, ahead of the slot table",
        description=(
            "Pin CHANNEL (as `shardpool status` shows it) of a running backend to WORKER "
            "(default: the least loaded other worker), through the same barrier as a slot move: "
            "a hot channel on a worker of its own. `shardpool unpin` sends it back. "
            f"Exit {EXIT_OK} once it is there, {EXIT_USAGE} for a bad channel id or a worker that "
            f"does not exist, {EXIT_FAILURE} if the move was refused or called off, or no "
            "backend answers."
        ),
    )
    p.add_argument("channel", type=_channel, metavar="CHANNEL", help=_CHANNEL_HELP)
    p.add_argument("worker", type=_worker_index, nargs="?", metavar="WORKER",
                   help="the worker to pin it to (default: the least loaded other one)")
    _add_placement_args(p, timeout=30.0)
    p.set_defaults(func=cmd_pin, op="pin")


def _add_unpin(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "unpin",
        help="send a pinned channel back to its slot's worker",
        description=(
            "Undo `shardpool pin CHANNEL`: the channel goes back to the worker its slot belongs "
            f"to, through the move barrier. Exit {EXIT_OK} once it is there, {EXIT_USAGE} for a "
            f"bad channel id, {EXIT_FAILURE} if the channel is not pinned, the move was refused "
            "or called off, or no backend answers."
        ),
    )
    p.add_argument("channel", type=_channel, metavar="CHANNEL", help=_CHANNEL_HELP)
    _add_placement_args(p, timeout=30.0)
    p.set_defaults(func=cmd_pin, op="unpin", worker=None)


def cmd_pin(args: argparse.Namespace) -> int:
    """``pin`` / ``unpin`` through the control socket."""
    from shardpool.channelid import format_channel

    cid: bytes = args.channel
    payload: dict[str, Any] = {"channel": cid.hex(), "timeout": args.timeout}
    if args.worker is not None:
        payload["worker"] = args.worker
    reply = _control_request(
        args, args.op, payload, timeout=args.timeout + 5.0, client_timeout=args.timeout + 5.0,
        note=_channel_note(cid),
    )
    if isinstance(reply, int):
        return reply
    done = not reply["moved"] or reply["state"] == "committed"
    if args.json:
        print(json.dumps(reply, indent=2))
        return EXIT_OK if done else EXIT_FAILURE
    if not done:
        print(
            f"{args.op} channel {format_channel(cid)}: move {reply['gen']} to worker "
            f"{reply['worker']} not done within {args.timeout:g} s: {reply['state']}"
        )
        return EXIT_FAILURE
    how = (
        f"move {reply['gen']} from worker {reply['src']}, messages held {_ms(reply['pause_s'])}"
        if reply["moved"]
        else "it was there already"
    )
    where = "pinned to" if args.op == "pin" else "unpinned: back on its slot's"
    print(f"channel {format_channel(cid)} {where} worker {reply['worker']} ({how})")
    return EXIT_OK


def _add_resize(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "resize",
        help="change the number of workers of a running backend",
        description=(
            "Grow or shrink a running backend to N workers without stopping it: new workers "
            "start and take slots by measured load; retiring ones (the last) hand every slot "
            "and pinned channel over, then stop. Nothing is lost or reordered. SIGTTIN and "
            "SIGTTOU to `shardpool run` add or remove one worker. "
            f"Exit {EXIT_OK} once done, {EXIT_USAGE} for a count out of range, {EXIT_FAILURE} if "
            "it was refused or called off (a new worker could not start), is not done within "
            "--timeout (it goes on), or no backend answers."
        ),
    )
    p.add_argument("workers", type=_worker_count, metavar="N", help="the number of workers")
    p.add_argument("--no-wait", action="store_true", help="return once the resize has started")
    _add_placement_args(p, timeout=120.0)
    p.set_defaults(func=cmd_resize)


def cmd_resize(args: argparse.Namespace) -> int:
    """``resize`` through the control socket."""
    payload: dict[str, Any] = {"workers": args.workers, "timeout": args.timeout}
    if args.no_wait:
        payload["wait"] = False
    reply = _control_request(
        args, "resize", payload, timeout=args.timeout + 5.0, client_timeout=args.timeout + 5.0
    )
    if isinstance(reply, int):
        return reply
    ok = reply.get("started") or (reply["done"] and reply["workers"] == args.workers)
    if args.json:
        print(json.dumps(reply, indent=2))
    elif reply.get("started"):
        print(f"resize to {args.workers} workers started ({reply['workers']} workers now)")
    elif not reply["done"]:
        print(
            f"resize to {args.workers} workers not done within {args.timeout:g} s "
            f"({reply['workers']} workers now; it goes on)"
        )
    elif not ok:
        print(
            f"resize to {args.workers} workers was overtaken by a later resize: "
            f"{reply['workers']} workers now"
        )
    else:
        print(f"resized to {reply['workers']} workers in {reply['seconds']:.1f} s")
    return EXIT_OK if ok else EXIT_FAILURE


def _add_roll(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "roll",
        help="replace every worker process of a running backend, one at a time",
        description=(
            "Rolling restart: each worker in turn hands its slots and pinned channels to the "
            "others, stops, is replaced by a fresh process (which imports the handler code "
            "anew) and takes its share back. Nothing is lost or reordered; handler state moves "
            "with the slots. SIGHUP to `shardpool run` does the same after reloading the config. "
            f"Exit {EXIT_OK} once done, {EXIT_FAILURE} if it was refused (a roll or resize under "
            "way) or called off, is not done within --timeout (it goes on), or no backend answers."
        ),
    )
    p.add_argument("--no-wait", action="store_true", help="return once the roll has started")
    _add_placement_args(p, timeout=300.0)
    p.set_defaults(func=cmd_roll)


def cmd_roll(args: argparse.Namespace) -> int:
    """``roll`` through the control socket."""
    payload: dict[str, Any] = {"timeout": args.timeout}
    if args.no_wait:
        payload["wait"] = False
    reply = _control_request(
        args, "roll", payload, timeout=args.timeout + 5.0, client_timeout=args.timeout + 5.0
    )
    if isinstance(reply, int):
        return reply
    if args.json:
        print(json.dumps(reply, indent=2))
    elif reply.get("started"):
        print(f"rolling restart of {reply['workers']} worker(s) started")
    elif not reply["done"]:
        print(f"rolling restart not done within {args.timeout:g} s (it goes on)")
    else:
        print(f"rolled {reply['workers']} worker(s) in {reply['seconds']:.1f} s")
    return EXIT_OK if reply.get("started") or reply["done"] else EXIT_FAILURE


# registered in _SUBCOMMANDS below: run, bench, status, drain, undrain, stop, keys, resume, skip,
# move, pin, unpin, resize, roll, dead-letters, worker.

_SUBCOMMANDS: tuple[Callable[[_Subparsers], None], ...] = (
    _add_check_config,
    _add_bench,
    _add_run,
    _add_status,
    _add_drain,
    _add_undrain,
    _add_stop,
    _add_keys,
    _add_resume,
    _add_skip,
    _add_move,
    _add_pin,
    _add_unpin,
    _add_resize,
    _add_roll,
    _add_dead_letters,
    _add_worker,
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    from shardpool import __version__

    parser = argparse.ArgumentParser(
        prog="shardpool",
        description="Multiprocess sharded worker pool with strict per-channel order.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"shardpool {__version__}")
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
