"""Builds the two C extensions: trafficthreshold._counter (the hot path:
the segment) and trafficthreshold._middleware (the WSGI middleware's
per-request path); and libtrafficthreshold.so, the same C core
(trafficthreshold/core/) for any language with a C FFI, installed with its
header trafficthreshold.h (``trafficthreshold c-paths`` prints where).

Everything else is in setup.cfg.  A missing compiler gets a message that
says what to install instead of a compiler traceback.
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


#: Built as a plain shared library (no Python in it, no module init), named
#: libtrafficthreshold.so so that ``-ltrafficthreshold`` finds it.
LIBRARY = "trafficthreshold.core.libtrafficthreshold"


class BuildExt(build_ext):
    def get_ext_filename(self, fullname):
        # Called with the full name, and with its last part alone.
        if fullname in (LIBRARY, LIBRARY.rpartition(".")[2]):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def get_export_symbols(self, ext):
        if ext.name == LIBRARY:
            return []  # tt_lib.c exports its own API (visibility("default"))
        return super().get_export_symbols(ext)

    def run(self):
        try:
            super().run()
        except Exception as exc:  # distutils' errors differ between versions
            raise SystemExit(
                "trafficthreshold: building the C extension failed (%s).\n"
                "It needs a C compiler and the Python headers: on Debian/Ubuntu "
                "`apt-get install gcc python3-dev`, on Fedora `dnf install gcc "
                "python3-devel`, on Alpine `apk add build-base python3-dev`." % exc)


CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-Wno-missing-field-initializers", "-Wno-cast-function-type"]

setup(
    ext_modules=[
        # _counter.c includes the C core (trafficthreshold/core/tt_core.c).
        Extension("trafficthreshold._counter", sources=["trafficthreshold/_counter.c"],
                  extra_compile_args=CFLAGS, libraries=["rt", "pthread"],
                  depends=["trafficthreshold/core/tt_core.c", "trafficthreshold/core/tt_core.h",
                           "trafficthreshold/core/tt_layout.h"]),
        Extension("trafficthreshold._middleware", sources=["trafficthreshold/_middleware.c"],
                  extra_compile_args=CFLAGS),
        Extension(LIBRARY, sources=["trafficthreshold/core/tt_lib.c"],
                  extra_compile_args=CFLAGS + ["-fvisibility=hidden"],
                  extra_link_args=["-Wl,-soname,libtrafficthreshold.so"],
                  depends=["trafficthreshold/core/tt_core.c", "trafficthreshold/core/tt_core.h",
                           "trafficthreshold/core/tt_layout.h",
                           "trafficthreshold/core/tt_pageview.c"]),
    ],
    cmdclass={"build_ext": BuildExt},
)
