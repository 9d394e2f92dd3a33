"""Code run as the unprivileged user ``nobody`` by the tests, wherever the
clone is: a clone in a directory other users cannot enter (``mktemp -d``,
root's home, mode 0700) must pass too, so what ``nobody`` reads of the
package comes from a copy in a world-readable temporary directory.

* :func:`readable_package` -- that copy (made once per test session,
  removed at exit), for ``PYTHONPATH`` of a process started as nobody;
* :func:`use_readable_package` -- in a forked child about to become nobody:
  the package's later imports and its data (the templates) come from the
  copy.
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import trafficthreshold

PACKAGE = os.path.dirname(os.path.abspath(trafficthreshold.__file__))


@functools.lru_cache(maxsize=None)
def readable_package() -> str:
    """A directory readable by everyone holding a copy of the package
    (``trafficthreshold/``, built extensions included): put it first on
    ``PYTHONPATH``."""
    top = tempfile.mkdtemp(prefix="tt-readable-")
    atexit.register(shutil.rmtree, top, True)
    shutil.copytree(PACKAGE, os.path.join(top, "trafficthreshold"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for directory, dirs, files in os.walk(top):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    return top


def use_readable_package() -> None:
    """Repoint the imported package at :func:`readable_package` (in a forked
    child, before it drops to nobody): submodules imported later and
    package data found through the package's spec (jinja2's PackageLoader)
    are read from the copy.  The modules already imported stay as they
    are."""
    copy = os.path.join(readable_package(), "trafficthreshold")
    trafficthreshold.__path__[:] = [copy]
    spec = trafficthreshold.__spec__
    if spec is not None and spec.submodule_search_locations is not trafficthreshold.__path__:
        spec.submodule_search_locations[:] = [copy]
