"""Builds the two C extensions: trafficthreshold._counter (the hot path:
the segment) and trafficthreshold._middleware (the WSGI middleware's
per-request path).

Everything else is in setup.cfg.  A missing compiler gets a message that
says what to install instead of a compiler traceback.
"""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
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
        Extension("trafficthreshold._counter", sources=["trafficthreshold/_counter.c"],
                  extra_compile_args=CFLAGS, libraries=["rt", "pthread"]),
        Extension("trafficthreshold._middleware", sources=["trafficthreshold/_middleware.c"],
                  extra_compile_args=CFLAGS),
    ],
    cmdclass={"build_ext": BuildExt},
)
