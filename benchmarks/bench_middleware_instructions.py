"""What the WSGI middleware costs a gunicorn worker, in instructions.

    python benchmarks/bench_middleware_instructions.py [--quick]

Requests/s on a 2-CPU machine swing by several percent from run to run
(docs/webapps.rst), more than the 2 % target.  Instructions do not: one
sync gunicorn worker runs under ``valgrind --tool=callgrind``, serves N and
then 3N requests of tests/apps/hello.py, and the difference divided by 2N
is the instructions per request, start-up cancelled.  Done for the bare
app, the middleware with its defaults (the total only), with
``account="host"`` (two keys per hit), and with ``uniques=True``
(tests/apps/hello_uniques.py) in its common case: the visitor's request
carries today's day cookie.  Every variant's requests carry that same
``Cookie`` header (a browser sends it whatever the application), so the
server's work on it cancels out.

``--allowed-hosts`` also measures what an ``allowed_hosts`` list costs:
tests/apps/hello_hosts.py with ``allowed_hosts=["*"]`` (no list) against the
same module with a list that has the request's host.  Same module on both
sides, because two different application modules differ by a few thousand
instructions per request whatever they do per request (a different heap:
the garbage collector's passes fall differently within the measured
requests).  PYTHONHASHSEED is fixed, so reruns
agree.  Needs valgrind (Debian: ``apt-get install valgrind``).
"""
from __future__ import annotations

import argparse
import glob
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trafficthreshold import pageviews, periods, segment

TESTS = Path(__file__).resolve().parent.parent / "tests"
#: (name, application, TT_TEST_ACCOUNT, TT_TEST_ALLOWED_HOSTS)
VARIANTS = (("bare", "apps.hello:raw_app", "", ""),
            ("middleware, defaults", "apps.hello:app", "", ""),
            ('middleware, account="host"', "apps.hello:app", "host", ""),
            ("middleware, uniques=True", "apps.hello_uniques:app", "", ""))
ALLOWED_VARIANTS = (('host, allowed_hosts=["*"]', "apps.hello_hosts:app", "host", "*"),
                    ("host, allowed_hosts list", "apps.hello_hosts:app", "host",
                     "site.example,.example.org"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_instructions(app: str, account: str, requests: int, key: int, tmp: str,
                        allowed: str = "") -> int:
    """Total instructions of the one worker after serving ``requests``."""
    port = free_port()
    out = f"{tmp}/cg.{app.replace(':', '_')}.{account}.{len(allowed)}.{requests}"
    env = dict(os.environ, PYTHONHASHSEED="0", TRAFFICTHRESHOLD_KEY=str(key),
               TT_TEST_ACCOUNT=account, TT_TEST_ALLOWED_HOSTS=allowed)
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "-q", f"--callgrind-out-file={out}.%p",
         sys.executable, "-m", "gunicorn", "--chdir", str(TESTS), "--bind",
         f"127.0.0.1:{port}", "--workers", "1", "--log-level", "warning", app], env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", "/healthz")
                conn.getresponse().read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("gunicorn under valgrind did not start") from None
                time.sleep(0.5)
        # Today's day cookie, as the uniques variant's first answer sets it
        # (the system's zone, as in hello_uniques.py); every variant sends it.
        stamp = pageviews.day_of(time.time(), periods.resolve_timezone(None))[0]
        headers = {"Host": "site.example", "Cookie": f"{pageviews.UNIQUE_COOKIE}={stamp}"}
        for _ in range(requests):
            conn.request("GET", "/", headers=headers)
            response = conn.getresponse()
            response.read()
            if (response.getheader("Connection") or "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    totals = []
    for path in glob.glob(out + ".*"):
        text = Path(path).read_text(errors="replace")
        match = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if match:
            totals.append(int(match.group(1)))
    return max(totals)  # the worker served everything; the master did little


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, for CI")
    parser.add_argument("--allowed-hosts", action="store_true",
                        help="also measure an allowed_hosts list against no list")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind): nothing measured")
        return 0 if args.quick else 1
    # Quick: 200 requests measured. With 100, garbage-collection passes
    # falling inside or outside the window swung a variant by over 1 %.
    n = 100 if args.quick else 300
    key = segment.unused_key()
    segment.install(key)
    per_request = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, app, account, allowed in VARIANTS + (
                    ALLOWED_VARIANTS if args.allowed_hosts else ()):
                low = worker_instructions(app, account, n, key, tmp, allowed)
                high = worker_instructions(app, account, 3 * n, key, tmp, allowed)
                per_request[name] = (high - low) / (2 * n)
    finally:
        segment.uninstall(key, force=True)
    bare = per_request["bare"]
    print(f"instructions per request of a sync gunicorn worker ({2 * n} requests measured)")
    for name, value in per_request.items():
        extra = "" if name == "bare" else \
            f"  +{value - bare:,.0f} = {100 * (value / bare - 1):+.2f} %"
        print(f"  {name:<30} {value:>10,.0f}{extra}")
    if args.allowed_hosts:
        (star, _, _, _), (listed, _, _, _) = ALLOWED_VARIANTS
        delta = per_request[listed] - per_request[star]
        print(f"the allowed_hosts list itself: {delta:+,.0f} instructions per request "
              f"= {100 * delta / bare:+.2f} % (same module, list against no list)")
    verdicts = []
    for name, _app, _account, _allowed in VARIANTS[1:]:
        overhead = per_request[name] / bare - 1
        verdicts.append("PASS" if overhead < 0.02 else "FAIL")
        print(f"{verdicts[-1]}  {name} < 2 % of a hello-world request: {100 * overhead:.2f} %")
    return 0 if args.quick or verdicts == ["PASS"] * len(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
