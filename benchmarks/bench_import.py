"""What does a web worker's first hit() load, and how long does it take?

Run by hand::

    python benchmarks/bench_import.py          # 15 fresh interpreters per row
    python benchmarks/bench_import.py --quick  # CI smoke mode, 3 per row

A worker chooses its segment by ``TRAFFICTHRESHOLD_KEY`` (the documented
way); its first ``hit()`` attaches.  Each row runs in fresh interpreters
(an import happens once per process), after one unmeasured run that
writes the .pyc files, and reports the median time and the modules that
the step added to ``sys.modules``:

* ``import trafficthreshold``: the worker API, the same in both columns;
* ``first hit()``, *now*: what this tree's first hit loads (the
  environment module, nothing of the daemon);
* ``first hit()``, *before*: the same preceded by importing
  ``trafficthreshold.config`` and ``trafficthreshold.segment``, as the
  first hit did until the worker's environment got a module of its own
  (a stand-in measured in the same run, on the same machine);
* ``first request``, *now*: one page view through the WSGI middleware
  (constructed in the step), for comparison.

The exit status is 1 when a *now* step loads any of the daemon's modules
(``trafficthreshold.config``, ``trafficthreshold.segment``, ``sysv_ipc``,
``posix_ipc``, ``tomllib``) or the hit is not counted.  Times are for
information (a loaded 2-core machine moves them); none is a target.

The segment is installed at a fresh random key and removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trafficthreshold import segment  # noqa: E402

DAEMON = ("trafficthreshold.config", "trafficthreshold.segment", "sysv_ipc", "posix_ipc",
          "tomllib")

#: A child: times ``import trafficthreshold`` and then STEP, and prints
#: {"import": [ms, modules], "step": [ms, modules], "daemon": [...], "count": n}.
CHILD = """
import json, sys, time
seen = set(sys.modules)
start = time.perf_counter()
import trafficthreshold
imported = time.perf_counter()
after_import = set(sys.modules)
STEP
done = time.perf_counter()
print(json.dumps({
    "import": [(imported - start) * 1e3, sorted(after_import - seen)],
    "step": [(done - imported) * 1e3, sorted(set(sys.modules) - after_import)],
    "daemon": [name for name in DAEMON if name in sys.modules],
    "count": trafficthreshold.count("site-a.example")}))
"""

HIT = 'trafficthreshold.hit("site-a.example")'
BEFORE = 'import trafficthreshold.config, trafficthreshold.segment\n' + HIT
WSGI = """
from trafficthreshold.wsgi import TrafficThreshold
def page(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/html")])
    return [b"<p>hi"]
environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "HTTP_HOST": "site-a.example",
           "HTTP_ACCEPT": "text/html", "wsgi.url_scheme": "http"}
b"".join(TrafficThreshold(page, account="host")(environ, lambda *args: None))
"""


def run(step: str, env: dict[str, str]) -> dict:
    code = f"DAEMON = {DAEMON!r}\n" + CHILD.replace("STEP", step)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(step: str, env: dict[str, str], repeats: int) -> dict:
    """Medians of ``repeats`` fresh runs (after one unmeasured run)."""
    run(step, env)
    runs = [run(step, env) for _ in range(repeats)]
    return {"import_ms": statistics.median(r["import"][0] for r in runs),
            "import_modules": runs[-1]["import"][1],
            "step_ms": statistics.median(r["step"][0] for r in runs),
            "step_modules": runs[-1]["step"][1],
            "daemon": sorted({name for r in runs for name in r["daemon"]}),
            "counts": {r["count"] for r in runs}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke mode: 3 runs per row")
    parser.add_argument("--backend", choices=segment.BACKENDS, default="sysv")
    parser.add_argument("--verbose", action="store_true", help="list the modules loaded")
    args = parser.parse_args()
    repeats = 3 if args.quick else 15

    key = segment.unused_key()
    segment.install(key, args.backend)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAFFICTHRESHOLD_")}
        env.update(TRAFFICTHRESHOLD_KEY=hex(key), TRAFFICTHRESHOLD_BACKEND=args.backend)
        now = measure(HIT, env, repeats)
        before = measure(BEFORE, env, repeats)
        wsgi = measure(WSGI, env, repeats)
    finally:
        segment.uninstall(key, args.backend, force=True)

    print(f"A worker with TRAFFICTHRESHOLD_KEY set, {args.backend}; median of {repeats} "
          "fresh interpreters")
    print(f"{'':28}{'now':>18}{'before':>18}{'before/now':>12}")
    rows = [("import trafficthreshold", now["import_ms"], len(now["import_modules"]),
             before["import_ms"], len(before["import_modules"])),
            ("first hit()", now["step_ms"], len(now["step_modules"]),
             before["step_ms"], len(before["step_modules"]))]
    for name, now_ms, now_n, before_ms, before_n in rows:
        print(f"{name:28}{now_ms:8.2f} ms {now_n:3d} mod{before_ms:8.2f} ms {before_n:3d} mod"
              f"{before_ms / now_ms:11.0f}x")
    print(f"{'first request (WSGI)':28}{wsgi['step_ms']:8.2f} ms "
          f"{len(wsgi['step_modules']):3d} mod")
    if args.verbose:
        for label, result in (("now", now), ("before", before), ("WSGI", wsgi)):
            print(f"{label}: {' '.join(result['step_modules'])}")

    failures = []
    for label, result in (("first hit()", now), ("first request (WSGI)", wsgi)):
        if result["daemon"]:
            failures.append(f"{label} loaded the daemon's {', '.join(result['daemon'])}")
    for label, result in (("now", now), ("before", before), ("WSGI", wsgi)):
        if min(result["counts"]) < 1:
            failures.append(f"{label}: the hit was not counted ({sorted(result['counts'])})")
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
