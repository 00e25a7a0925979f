"""Exit codes of the ``shardpool`` processes, defined once: the CLI and ``shardpool run`` (read by
a shell or a service manager), and the worker processes (read by their front, which names them in
its logs and errors; a negative code is the signal that killed the process).
"""

from __future__ import annotations

import signal

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_FENCED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PARENT_GONE",
    "EXIT_START_FAILED",
    "EXIT_USAGE",
]

EXIT_OK = 0
"""Done as asked: a valid config, a clean drain, the order kept. For a worker: it stopped when
asked, every call it started finished and acknowledged (BYE)."""
EXIT_FAILURE = 1
"""Something failed at run time (not the caller's input): no backend answered, a run failed, the
shutdown was not clean."""
EXIT_USAGE = 2
"""Bad command line; argparse uses 2 too, so one code means "fix how you called it"."""
EXIT_CONFIG = EXIT_USAGE
"""An invalid config file is the caller's input as well, hence the same code as a usage error."""
EXIT_INTERRUPTED = 128 + signal.SIGINT
"""Stopped by Ctrl-C (SIGINT) before it finished, as a shell reports it."""

# Worker processes.
EXIT_START_FAILED = 3
"""A worker could not import, build or set up its handler; a FATAL frame carried the traceback."""
EXIT_PARENT_GONE = 4
"""A worker's front disappeared; the worker left rather than run orphaned."""
EXIT_FENCED = 5
"""A remote worker lost its lease (it heard nothing from its front for ``remote.lease_s``) while a
handler call ran on past the grace: it left, so that the front can give the call's channel to
another worker without it ever running on two hosts at once."""
