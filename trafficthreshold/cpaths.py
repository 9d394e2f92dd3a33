"""Where the C library and its header are installed, for C programs and any
language with a C FFI (``trafficthreshold c-paths``; docs/php.rst, "Other
languages").

libtrafficthreshold.so is the same C core as the Python and PHP extensions
(``trafficthreshold/core/``), built by setup.py next to the package's other
extensions, with its header ``trafficthreshold.h``; both are installed
inside the package, in ``trafficthreshold/core/``.
"""
from __future__ import annotations

import os

CORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "core")
LIBRARY = os.path.join(CORE, "libtrafficthreshold.so")
HEADER = os.path.join(CORE, "trafficthreshold.h")


def paths() -> dict[str, str]:
    """{"include": dir, "header": path, "library": path, "libdir": dir,
    "cflags": ..., "libs": ...}; FileNotFoundError naming the fix when the
    library was not built."""
    for path in (HEADER, LIBRARY):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} is missing: this trafficthreshold was installed without its C "
                "library; reinstall it with a C compiler present (`pip install --force-reinstall "
                "trafficthreshold`, or `pip install -e .` in a checkout)")
    return {"include": CORE, "header": HEADER, "library": LIBRARY, "libdir": CORE,
            "cflags": f"-I{CORE}",
            "libs": f"-L{CORE} -Wl,-rpath,{CORE} -ltrafficthreshold"}
