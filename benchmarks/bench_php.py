"""What counting costs a PHP worker: trafficthreshold_hit() side by side with
PHP's usual ways, and the request-end page-view hook in instructions.

    python benchmarks/bench_php.py [--quick] [--extension PATH/trafficthreshold.so]

1. Per call from php-cli, side by side (benchmarks/bench_php.php: 7 rounds,
   each timing every method in turn, the best round of each): an empty PHP
   user function call (the floor), ``crc32()`` of a short name, APCu's
   ``apcu_inc()`` (Debian's php8.2-apcu, PHP's usual shared-memory counter,
   one pool only), the Mint pepper's own method (a sysvsem semaphore around
   a shmop read and write) and ``trafficthreshold_hit("example.com")``; then
   each one's exactness from 4 forked processes.  Targets:
   ``trafficthreshold_hit()`` within 4x the empty call and at least 3x
   faster than ``apcu_inc()``; every count exact.
2. The request-end hook (``trafficthreshold.pageviews = On``) on a
   hello-world page under php-fpm behind nginx: one php-fpm worker runs
   under ``valgrind --tool=callgrind``, serves N and then 3N requests, and
   the difference divided by 2N is its instructions per request, start-up
   cancelled; pageviews Off (the extension loaded, doing nothing) against
   On (the total only) and On with ``account = host``.  Target: the hook's
   instructions under 2 % of the request's without it (the median of the
   three runs' requests minus their hooks: one run's whole request moves
   by a few per cent from one php-fpm run to the next).

Without --extension the extension is built first (phpize, configure, make)
in a scratch directory.  The segment is installed at a fresh key and removed
at the end.  A full run exits with 1 when a target is missed or a count is
wrong; --quick (CI smoke: fewer calls and requests) only when a count is
wrong.
"""
from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from trafficthreshold import segment

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from tt_php import PhpSite, build_extension  # noqa: E402

HELLO = '<?php echo "<!doctype html><title>hello</title><p>hello, world";\n'


def cli_costs(extension: Path, calls: int, key: int, rounds: int) -> dict:
    """bench_php.php's JSON: {"ns": {...}, "exact": {...}}."""
    done = subprocess.run(
        ["php", "-d", f"extension={extension}", "-d", "apc.enable_cli=1",
         "-d", f"trafficthreshold.key={key:#x}", str(HERE / "bench_php.php"), str(calls),
         str(key + 1), str(rounds)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"bench_php.php failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def hook_instructions(path: str) -> int:
    """Instructions spent inside the request-end hook (RSHUTDOWN,
    zm_deactivate_trafficthreshold, with what it calls) in one profile."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r"^\s*([\d,]+) .*zm_deactivate_trafficthreshold", out, re.M)
    return int(match.group(1).replace(",", "")) if match else 0


def worker_instructions(tmp: Path, extension: Path, key: int, requests: int,
                        ini: dict[str, str]) -> tuple[int, int]:
    """Instructions of the php-fpm worker after serving `requests`: in all,
    and inside the request-end hook."""
    root = tmp / "www"
    root.mkdir(exist_ok=True)
    (root / "index.php").write_text(HELLO)
    name = "-".join(f"{v}" for v in ini.values()) or "off"
    work = tmp / f"site-{name}-{requests}"
    out = work / "cg"
    work.mkdir()
    settings = {"extension": str(extension), "trafficthreshold.key": hex(key), **ini}
    site = PhpSite(work, root, settings, workers=1,
                   wrapper=["valgrind", "--tool=callgrind", "-q",
                            f"--callgrind-out-file={out}.%p"]).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=60)
        for _ in range(requests):
            conn.request("GET", "/", headers={"Host": "shop.example"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200
        conn.close()
    finally:
        master = site.fpm.pid if site.fpm is not None else -1
        site.stop()
    total = hook = 0
    for path in glob.glob(f"{out}.*"):
        if path.endswith(f".{master}"):
            continue  # the master's (valgrind runs in the fpm master's pid)
        match = re.search(r"^(?:summary|totals): (\d+)", Path(path).read_text(errors="replace"),
                          re.M)
        if match is None:
            raise RuntimeError(f"{path}: callgrind wrote no totals (a worker that did not exit "
                               "normally)")
        total += int(match.group(1))
        hook += hook_instructions(path)
    return total, hook


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and requests, for CI")
    parser.add_argument("--extension", type=Path, help="a built trafficthreshold.so")
    args = parser.parse_args()
    if shutil.which("php") is None:
        print("php-cli is not installed (apt-get install php8.2-cli): nothing measured")
        return 1
    calls = 200_000 if args.quick else 2_000_000
    rounds = 3 if args.quick else 7
    requests = 50 if args.quick else 200
    key = segment.unused_key()
    ok = True
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        extension = args.extension or build_extension(tmp / "build") / "modules" / \
            "trafficthreshold.so"
        segment.install(key)
        try:
            result = cli_costs(extension, calls, key, rounds)
            load = os.getloadavg()[0]
            ns = result["ns"]
            floor = ns["empty_function"]
            print(f"per call from php-cli (best of {rounds} rounds, each timing every method "
                  f"in turn, {calls:,} calls each; the loop subtracted; load average "
                  f"{load:.2f})")
            print(f"  {'operation':<34} {'ns/call':>8} {'x empty call':>13}")
            labels = {"empty_function": "empty PHP function call (floor)",
                      "crc32": 'crc32("example.com")',
                      "trafficthreshold_hit": 'trafficthreshold_hit("example.com")',
                      "apcu_inc": 'apcu_inc("example.com")',
                      "pepper": "pepper: sem_acquire+shmop r/w+release"}
            for name in ("empty_function", "crc32", "trafficthreshold_hit", "apcu_inc",
                         "pepper"):
                if name in ns:
                    print(f"  {labels[name]:<34} {ns[name]:>8.1f} "
                          f"{ns[name] / floor if floor else float('nan'):>13.2f}")
            print("exactness from 4 forked processes (expected, counted):")
            for name, (expected, counted) in result["exact"].items():
                verdict = "ok" if expected == counted else "WRONG"
                ok &= expected == counted
                print(f"  {name:<22} {expected:>10,} {counted:>10,}  {verdict}")
            hit = ns.get("trafficthreshold_hit")
            if hit is None:
                print("FAIL  trafficthreshold_hit() was not measured (extension not loaded)")
                ok = False
            targets = []
            if hit is not None:
                targets.append((hit <= 4 * floor, f"trafficthreshold_hit() within 4x the empty "
                                                  f"call: {hit / floor:.2f}x"))
                if "apcu_inc" in ns:
                    targets.append((3 * hit <= ns["apcu_inc"], f"at least 3x faster than "
                                    f"apcu_inc(): {ns['apcu_inc'] / hit:.1f}x"))
                targets.append((True, f"faster than the pepper's method: "
                                      f"{ns['pepper'] / hit:.0f}x"))
            if shutil.which("valgrind") is None:
                print("valgrind is not installed (apt-get install valgrind): the hook is not "
                      "measured")
                ok &= args.quick
            else:
                per_request, in_hook = {}, {}
                for label, ini in (("pageviews Off", {}),
                                   ("pageviews On", {"trafficthreshold.pageviews": "On"}),
                                   ("pageviews On, account=host",
                                    {"trafficthreshold.pageviews": "On",
                                     "trafficthreshold.account": "host",
                                     "trafficthreshold.allowed_hosts": "shop.example"})):
                    low, low_hook = worker_instructions(tmp, extension, key, requests, ini)
                    high, high_hook = worker_instructions(tmp, extension, key, 3 * requests,
                                                          ini)
                    per_request[label] = (high - low) / (2 * requests)
                    in_hook[label] = (high_hook - low_hook) / (2 * requests)
                # The request without the hook, measured three times (each
                # run's request minus its hook): the whole request's count
                # moves by a few per cent between two php-fpm runs, so the
                # median of the three is the base, not one run's figure.
                off = statistics.median(per_request[label] - in_hook[label]
                                        for label in per_request)
                print(f"instructions per hello-world request of one php-fpm worker "
                      f"({2 * requests} requests measured, callgrind): the whole request, "
                      f"and inside the request-end hook; the base is the median of the "
                      f"three runs' requests without their hook: {off:,.0f}")
                for label, value in per_request.items():
                    print(f"  {label:<30} {value:>10,.0f}  hook {in_hook[label]:>6,.0f} = "
                          f"{100 * in_hook[label] / off:.2f} % of the base")
                # The hook's own instructions decide: the whole request's
                # count moves by more than that between two php-fpm runs.
                for label in ("pageviews On", "pageviews On, account=host"):
                    overhead = in_hook[label] / off
                    targets.append((overhead < 0.02, f"{label}: the hook adds under 2 % of a "
                                                     f"hello-world request: {100 * overhead:.2f} %"))
            for passed, text in targets:
                print(f"{'PASS' if passed else 'FAIL'}  {text}")
                ok &= passed or args.quick
        finally:
            segment.uninstall(key, force=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
