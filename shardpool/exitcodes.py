"""Exit codes of the ``shardpool`` processes (the CLI and ``shardpool run``), defined once.

A worker process has its own codes (:mod:`shardpool.worker`): they are read by its front, not by
a shell.
"""

from __future__ import annotations

import signal

__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE"]

EXIT_OK = 0
"""Done as asked: a valid config, a clean drain, the order kept."""
EXIT_FAILURE = 1
"""Something failed at run time (not the caller's input): no backend answered, a run failed, the
shutdown was not clean."""
EXIT_USAGE = 2
"""Bad command line; argparse uses 2 too, so one code means "fix how you called it"."""
EXIT_CONFIG = EXIT_USAGE
"""An invalid config file is the caller's input as well, hence the same code as a usage error."""
EXIT_INTERRUPTED = 128 + signal.SIGINT
"""Stopped by Ctrl-C (SIGINT) before it finished, as a shell reports it."""
