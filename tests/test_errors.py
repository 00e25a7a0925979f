"""The error tree in ``shardpool.errors`` names every error shardpool defines."""

from __future__ import annotations

import importlib
import pkgutil

import shardpool
from shardpool import errors


def _subclasses(cls: type[BaseException]) -> set[type[BaseException]]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def test_every_error_is_in_the_tree_and_its_diagram() -> None:
    # Import every module, so that errors defined outside errors.py are found too.
    for mod in pkgutil.walk_packages(shardpool.__path__, "shardpool."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
    diagram = errors.__doc__ or ""
    ours = {c for c in _subclasses(errors.ShardPoolError) if c.__module__.startswith("shardpool")}
    assert {"ControlError", "NotRunning", "EndpointInUse", "InsecurePathError"} <= {
        c.__name__ for c in ours
    }
    missing = sorted(c.__name__ for c in ours if f"── {c.__name__} " not in diagram)
    assert not missing, f"not in the diagram of shardpool.errors: {missing}"
    for name in ("ControlError", "NotRunning", "EndpointInUse", "InsecurePathError"):
        assert getattr(errors, name).__module__ == "shardpool.errors"
