"""The C core without Python: libtrafficthreshold.so and its header, as a C
program (or any C FFI) uses them.  `trafficthreshold c-paths` says where
they are; a small C program (tests/c/ffi_hits.c) is compiled against them
and run in several processes at once, and the counts are read back with
the Python module, exactly.  The core's names' rules and page-view rule
(used by the PHP extension too) are checked against names.py and
pageviews.py with the shared table and random input."""
from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import time
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import trafficthreshold
from trafficthreshold import names, pageviews, segment
from trafficthreshold.cpaths import paths

HERE = Path(__file__).resolve().parent
CASES = json.loads((HERE / "data" / "pageview_cases.json").read_text())["cases"]


def c_paths(what: str) -> str:
    done = subprocess.run([sys.executable, "-m", "trafficthreshold.cli", "c-paths", f"--{what}"],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    """tests/c/ffi_hits.c compiled with the flags `trafficthreshold c-paths` prints."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (apt-get install gcc)")
    out = tmp_path_factory.mktemp("ffi") / "ffi_hits"
    subprocess.run([cc, "-O2", "-Wall", "-Werror", str(HERE / "c" / "ffi_hits.c"), "-o", str(out),
                    *c_paths("cflags").split(), *c_paths("libs").split()], check=True)
    return out


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(paths()["library"])
    lib.tt_page_view_rule.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                                      ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                                      ctypes.c_size_t]
    lib.tt_check_names_error.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                                         ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    return lib


def test_c_paths_names_the_header_and_the_library():
    found = json.loads(c_paths("json"))
    assert Path(found["header"]).name == "trafficthreshold.h" and Path(found["header"]).exists()
    assert Path(found["library"]).name == "libtrafficthreshold.so"
    assert found["cflags"] == f"-I{Path(found['header']).parent}"


def test_a_c_program_counts_exactly_from_several_processes(program, installed):
    """4 processes of the C program at once, 30,000 hits each: every hit is
    in the segment once, under its account and in the total, and the funnel
    status too; a bad name is refused (the program checks)."""
    key, backend = installed
    procs = [subprocess.Popen([str(program), hex(key), "30000", f"shop{i % 2}.example"],
                              stdout=subprocess.PIPE, text=True,
                              env={"TRAFFICTHRESHOLD_BACKEND": backend})
             for i in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert all(o.startswith("ok account name 'a:b' contains ':'") for o in outs), outs
    trafficthreshold.configure(key=key, backend=backend)
    try:
        window = "60s"
        got = [trafficthreshold.count("shop0.example", window=window),
               trafficthreshold.count("shop1.example", window=window),
               trafficthreshold.count(None, window=window),
               trafficthreshold.count(None, "order", window=window, status="paid")]
        sent = [60_000, 60_000, 120_000, 4]
        counter = segment.attach(key, backend)
        head = segment.header(counter)
        counter.detach()
        if head["lock_timeouts"] == 0:
            assert got == sent, head
        else:
            # A loaded machine: a roll-over's wait for the lock passed 50 ms
            # and its addition was dropped (fail open, docs/segment.rst):
            # nothing counted twice, every hit missing reported dropped.
            assert all(0 <= s - g <= head["dropped_hits"] for g, s in zip(got, sent)), \
                (got, head)
    finally:
        trafficthreshold.configure(key=segment.DEFAULT_KEY)


def test_without_a_segment_the_library_fails_open_and_says_why(program, key):
    out = subprocess.run([str(program), hex(key), "0", "x"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith(f"attached=0 layout={segment.LAYOUT_VERSION} error=no "
                          f"trafficthreshold segment at SysV IPC key {hex(key)}; run "
                          "`trafficthreshold install`"), out
    assert "hit=-1 level=0 count=0" in out


def c_names_ok(lib, account: str | None, event: str) -> bool:
    a = None if account is None else account.encode("utf-8", "surrogatepass")
    e = event.encode("utf-8", "surrogatepass")
    error = ctypes.create_string_buffer(400)
    return lib.tt_check_names_error(a, len(a or b""), e, len(e), error, 400) == 0


def python_names_ok(account: str | None, event: str) -> bool:
    try:
        names.validate(account, event)
    except ValueError:
        return False
    return True


TRICKY = ["example.com", "", ".", "..", "...", "a/b", "a\\b", "a:b", "~x", "x~", "all", "ALL",
          "a" * 64, "a" * 65, "é" * 32, "é" * 33, "a\x00", "a\x7f", "a\x85", "a\u2028",
          "a\u2029", "\ud800", "日本", "order/paid", "order/paid/x", "/paid", "order/",
          "e" * 20 + "/" + "s" * 11, "e" * 20 + "/" + "s" * 12, " ", "a b", "a\tb"]


@pytest.mark.parametrize("name", TRICKY)
def test_the_cores_names_rules_are_names_py(lib, name):
    assert c_names_ok(lib, name, "pageview") is python_names_ok(name, "pageview"), name
    assert c_names_ok(lib, None, name) is python_names_ok(None, name), name


@pytest.mark.parametrize("raw", [b"a/\x1b[31mred", b"a:\r\nforged log line", b"a\\\xff\xfe",
                                 b"a/\xc3", b"\xc3\xa9" * 40, b".\x00" * 40,
                                 b"a/b/\x1b[2J", b"\x1b[2J/b/c", b"a/b/" + b"\xc3\xa9" * 40])
def test_the_cores_name_messages_carry_only_checked_text(lib, raw):
    """The core's message names the bad name, and PHP logs it: it must not
    echo control characters (a forged log line, a terminal escape) nor
    invalid or cut UTF-8 from a name fed from the network."""
    error = ctypes.create_string_buffer(400)
    for account, event in ((raw, b"pageview"), (None, raw)):
        assert lib.tt_check_names_error(account, len(account or b""), event, len(event),
                                        error, 400) == -1
        text = error.value.decode("utf-8")  # valid UTF-8, whole characters
        assert not any(ord(ch) < 0x20 or 0x7f <= ord(ch) <= 0x9f for ch in text), text


@settings(max_examples=400, deadline=None)
@given(account=st.one_of(st.none(), st.text(max_size=70)), event=st.text(max_size=40))
def test_the_cores_names_rules_agree_on_any_name(lib, account, event):
    assert c_names_ok(lib, account, event) is python_names_ok(account, event)


def c_rule(lib, status: int, content_type: str | None, accept: str | None,
           path: str = "/", method: str = "GET") -> bool:
    ct = None if content_type is None else content_type.encode("latin-1")
    ac = None if accept is None else accept.encode("latin-1")
    return bool(lib.tt_page_view_rule(method.encode(), path.encode("utf-8", "surrogatepass"),
                                      status, ct, len(ct or b""), ac, len(ac or b"")))


def python_rule(status: int, content_type: str | None, accept: str | None, path: str = "/",
                method: str = "GET") -> bool:
    info = pageviews.RequestInfo(method, path, status, pageviews.media_type(content_type), [],
                                 None, accept or "")
    return pageviews.is_page_view(info)


@pytest.mark.parametrize("case", CASES, ids=[c["why"] for c in CASES])
def test_the_cores_page_view_rule_follows_the_table(lib, case):
    """The rule the PHP extension's request-end hook applies (tt_pageview.c)."""
    assert c_rule(lib, case["status"], case["content_type"], case["accept"]) is case["counted"]


LATIN1 = st.text(alphabet=st.characters(max_codepoint=255), max_size=14)


@settings(max_examples=500, deadline=None)
@given(status=st.sampled_from([200, 204, 299, 301, 302, 304, 404, 500]),
       content_type=st.one_of(st.none(), LATIN1, st.sampled_from(
           ["text/html", " TEXT/Html ;charset=x", "application/xhtml+xml", ";", "\x85text/html"])),
       accept=st.one_of(st.none(), LATIN1, st.sampled_from(
           ["text/html", "text/html;q=0", "text/html; q=0.0 ", "*/*", "text/html;q=x",
            "image/*, text/html;level=1;q=0.5", "text/html;Q=-1", "text/html;q=nan"])),
       method=st.sampled_from(["GET", "HEAD", "POST"]))
def test_the_cores_page_view_rule_agrees_with_pythons(lib, status, content_type, accept, method):
    assert c_rule(lib, status, content_type, accept, method=method) is \
        python_rule(status, content_type, accept, method=method)


PATHS = st.one_of(
    st.sampled_from(sorted(pageviews.HEALTH_PATHS) + ["/static/", "/media/x", "/Static/x",
                                                      "/a.b/c", "/.css", "/x.CSS", "/x.css/",
                                                      "/x.woff2", "/x.woff3", "/a.tar.gz"]),
    st.builds(lambda a, b: a + b, st.sampled_from(["/", "/static/", "/a/b.", "/x"]),
              st.sampled_from([""] + sorted(pageviews.STATIC_EXTENSIONS)
                              + [e.upper() for e in pageviews.STATIC_EXTENSIONS] + [".php"])),
    st.text(alphabet="/.abcsjSJ", max_size=10))


@settings(max_examples=500, deadline=None)
@given(path=PATHS)
def test_the_cores_static_and_health_paths_are_pageviews_tables(lib, path):
    assert c_rule(lib, 200, "text/html", None, path=path) is \
        (not pageviews.is_excluded_path(path)), path


def test_a_key_reclaimed_under_the_library_is_counted_under_its_own_name(lib, installed):
    """The library caches a key's slot; the supervisor reclaims the slot
    (idle for the ring) and another name takes it.  The library's next hit
    of the old name finds its cached slot stale (the bucket tags' generation)
    and counts in a new slot: never into the slot's new owner."""
    key, backend = installed
    lib.tt_open.restype = ctypes.c_void_p
    lib.tt_open.argtypes = [ctypes.c_long, ctypes.c_char_p]
    lib.tt_hit_at.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                              ctypes.c_uint64, ctypes.c_uint64]
    lib.tt_close.argtypes = [ctypes.c_void_p]
    lib.tt_error.argtypes = [ctypes.c_void_p]
    lib.tt_error.restype = ctypes.c_char_p
    handle = lib.tt_open(key, backend.encode())
    counter = segment.attach(key, backend)
    try:
        now = int(time.time())
        old = now - 3 * 3600
        assert lib.tt_hit_at(handle, b"gone.example", None, 5, old) == 0, lib.tt_error(handle)
        slot = counter.find("gone.example", "pageview")
        reclaimed = counter.reclaim(old // 60 + 1)
        assert [r[1] for r in reclaimed] == ["gone.example"]
        counter.hit("new.example", "pageview", 3)
        assert counter.find("new.example", "pageview") == slot  # the slot changed hands
        assert lib.tt_hit_at(handle, b"gone.example", None, 7, now) == 0, lib.tt_error(handle)
        assert counter.count(counter.find("new.example", "pageview"), 0) == 3
        assert counter.count(counter.find("gone.example", "pageview"), 0) == 7
        assert counter.count(1, 0) == 10  # the total: 7 now, 3 from Python
        assert lib.tt_hit_at(handle, b"x.example", None, 1, now * 1000) == -1
        assert b"more than 366 days" in lib.tt_error(handle)
    finally:
        lib.tt_close(handle)
        counter.detach()


def test_the_layout_header_holds_the_numbers_the_module_exports():
    """core/tt_layout.h is the one place the layout's numbers are written in
    C; _counter.LAYOUT (which segment.py and its tests read) must be them."""
    import re
    from trafficthreshold import _counter
    header = (Path(paths()["include"]) / "tt_layout.h").read_text()
    defines = {m.group(1): int(m.group(2), 0) for m in
               re.finditer(r"^#define TT_(\w+) (0x[0-9A-Fa-f]+|\d+)u?L?$", header, re.M)}
    shared = set(defines) & set(_counter.LAYOUT)
    assert len(shared) >= 60, sorted(shared)
    assert {name: defines[name] for name in shared} == \
        {name: _counter.LAYOUT[name] for name in shared}
    assert _counter.MAX_HIT_N == 4294967295 and _counter.MAGIC == "TRFTHRSH"
    assert '#define TT_MAGIC_BYTES "TRFTHRSH"' in header
    # What segment.py still writes itself (the layouts it only reads) is the
    # header's too.
    from trafficthreshold import segment
    assert (segment.LAYOUT_VERSION_1, segment.LAYOUT_VERSION_2) == \
        (defines["LAYOUT_VERSION_1"], defines["LAYOUT_VERSION_2"])


@pytest.mark.parametrize("text", ["0x54546831", "0X54546831", " 1234 ", "010", "0", "1",
                                  "2147483647", "2147483648", "0x7fffffff", "0x80000000",
                                  "-1", "+5", "0x", "", "x10", "0x1g", "1e3", "12 3", "\t7\n",
                                  "0o17", "00x1"])
def test_the_cores_key_syntax_is_env_parse_key(lib, text):
    """trafficthreshold.key (PHP) and $TRAFFICTHRESHOLD_KEY (the library)
    take a key as `--key` does: decimal or 0x hex, never octal."""
    from trafficthreshold.env import parse_key
    key = ctypes.c_long()
    ok = lib.tt_key_of(text.encode(), ctypes.byref(key)) == 0
    try:
        expected = parse_key(text)
    except ValueError:
        expected = None
    if text == "+5":  # int() takes a sign; the core does not (no key is written so)
        expected = None
    assert (key.value if ok else None) == expected, text


def test_the_library_counts_every_hit_after_a_reinstall_in_the_new_segment(lib, key, backend):
    """uninstall + install under a writer of libtrafficthreshold: its next
    hit notices the retirement and attaches to the new segment at once
    (before, it waited up to 10 s); a hit while none is installed is not
    counted."""
    lib.tt_open.restype = ctypes.c_void_p
    lib.tt_open.argtypes = [ctypes.c_long, ctypes.c_char_p]
    lib.tt_hit.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint64]
    lib.tt_close.argtypes = [ctypes.c_void_p]
    lib.tt_attached.argtypes = [ctypes.c_void_p]
    segment.install(key, backend)
    h = lib.tt_open(key, backend.encode())
    try:
        assert lib.tt_hit(h, b"a.example", b"pageview", 1) == 0 and lib.tt_attached(h)
        segment.uninstall(key, backend, force=True)
        segment.install(key, backend)
        for _ in range(3):
            assert lib.tt_hit(h, b"a.example", b"pageview", 1) == 0
        segment.uninstall(key, backend, force=True)
        lib.tt_hit(h, b"a.example", b"pageview", 1)     # none installed: not counted
        segment.install(key, backend)
        for _ in range(2):
            assert lib.tt_hit(h, b"a.example", b"pageview", 1) == 0
        counter = segment.attach(key, backend)
        try:
            slot = counter.find("a.example", "pageview")
            assert slot is not None and counter.count(slot, 0) == 2
        finally:
            counter.detach()
    finally:
        lib.tt_close(h)


def _ffi_handle(lib, key, backend=""):
    lib.tt_open.restype = ctypes.c_void_p
    lib.tt_open.argtypes = [ctypes.c_long, ctypes.c_char_p]
    lib.tt_hit.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint64]
    lib.tt_close.argtypes = [ctypes.c_void_p]
    lib.tt_attached.argtypes = [ctypes.c_void_p]
    return lib.tt_open(key, backend.encode())


def _total(key, backend, account="a.example"):
    counter = segment.attach(key, backend)
    try:
        slot = counter.find(account, "pageview")
        return 0 if slot is None else counter.count(slot, 0)
    finally:
        counter.detach()


def test_the_library_sees_a_reinstall_to_the_other_backend_at_once(lib, key, monkeypatch):
    """The backend not configured (found: sysv, else posix): the sysv
    segment is uninstalled and installed again as posix; the library's
    next hit attaches to it (the core's attacher watches both backends;
    before, it watched the old backend only and waited out the 10 s)."""
    monkeypatch.delenv("TRAFFICTHRESHOLD_BACKEND", raising=False)
    segment.install(key, "sysv")
    h = _ffi_handle(lib, key)
    try:
        assert lib.tt_hit(h, b"a.example", b"pageview", 1) == 0
        segment.uninstall(key, "sysv", force=True)
        lib.tt_hit(h, b"a.example", b"pageview", 1)     # none installed: not counted
        segment.install(key, "posix")
        for _ in range(3):
            assert lib.tt_hit(h, b"a.example", b"pageview", 1) == 0
        assert _total(key, "posix") == 3
    finally:
        lib.tt_close(h)
        segment.uninstall(key, "posix", force=True)


def tried_once_a_second(key: int, hit, hitter_pid: int) -> None:
    """Asserts that `hit()`, a hit of a writer (process `hitter_pid`) whose
    segment at `key` was retired and which finds a half made one there,
    maps it once and then not again within the same second, though another
    process mapped it meanwhile (the segment's last pid).  The steps are
    taken again when they straddle a second (a second try is then due)."""
    for _ in range(5):
        # Just after a new second begins (the coarse clock lags by a tick).
        time.sleep(1 - time.time() % 1 + 0.03)
        start = time.time()
        hit()                                           # tried: half made
        tried = sysv_last_pid(key)
        other = int(subprocess.run(
            [sys.executable, "-c", "import os, sys, sysv_ipc; m = sysv_ipc.SharedMemory("
             "int(sys.argv[1])); m.detach(); print(os.getpid())", str(key)],
            capture_output=True, text=True, check=True).stdout)
        for _ in range(20):
            hit()
        last = sysv_last_pid(key)
        if time.time() < int(start) + 0.98:             # all within one second
            assert tried == hitter_pid, "the half made segment was not tried"
            assert last == other, "the half made segment was tried at every hit"
            return
    raise AssertionError("5 tries straddled a second: the machine is too loaded")


def sysv_last_pid(key: int) -> int:
    """The pid of the last shmat/shmdt of the SysV segment at `key`, read
    from /proc/sysvipc/shm (sysv_ipc.SharedMemory would attach it)."""
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()
    fields = lines[0].split()
    for line in lines[1:]:
        row = dict(zip(fields, line.split()))
        if int(row["key"]) == key:
            return int(row["lpid"])
    raise LookupError(hex(key))


def test_the_library_does_not_try_a_half_made_segment_at_every_hit(lib, key):
    """After an uninstall, a segment found half made at the key (created,
    not formatted: an install under way, or its installer killed) is tried
    once, then again only a second later: not at every hit (each try maps
    and unmaps it: shmat and shmdt, seen in the segment's last_pid)."""
    import os
    import sysv_ipc
    segment.install(key, "sysv")
    h = _ffi_handle(lib, key, "sysv")
    half = None
    try:
        assert lib.tt_hit(h, b"a.example", b"pageview", 1) == 0
        segment.uninstall(key, "sysv", force=True)
        half = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, size=8192, init_character=b"\0")
        half.detach()
        tried_once_a_second(key, lambda: lib.tt_hit(h, b"a.example", b"pageview", 1),
                            os.getpid())
        half.remove()
        half = None
        segment.install(key, "sysv")
        time.sleep(1.1)   # the half made retry: at most once a second
        for _ in range(2):
            assert lib.tt_hit(h, b"a.example", b"pageview", 1) == 0
        assert _total(key, "sysv") == 2
    finally:
        lib.tt_close(h)
        if half is not None:
            half.remove()


def test_threads_with_their_own_memos_share_one_writer_exactly(installed, tmp_path):
    """A threaded PHP (ZTS) in C: 4 threads share one writer under one
    mutex, each with its own hit memo and page-account memo (the
    extension's module globals, one copy per thread), each alternating two
    accounts so its memo is refilled at every hit: every hit is counted
    once, under its own account.  (No ZTS PHP is built here: Debian ships
    PHP without threads; tests/c/threads_memo.c is the extension's model.)"""
    key, backend = installed
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (apt-get install gcc)")
    out = tmp_path / "threads_memo"
    subprocess.run([cc, "-O2", "-Wall", "-Werror", "-Wno-unused-function", "-pthread", str(HERE / "c" / "threads_memo.c"),
                    "-o", str(out), *c_paths("cflags").split()], check=True)
    threads, hits = 4, 20_000
    done = subprocess.run([str(out), hex(key), backend, str(threads), str(hits)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
    counter = segment.attach(key, backend)
    try:
        m = int(time.time()) // 60

        def total(account):
            slot = counter.find(account, "pageview")
            return sum(n for s, _, n in counter.minutes(m - 2, m + 1) if s == slot)
        for t in range(threads):
            assert (total(f"t{t}a.example"), total(f"t{t}b.example")) == (hits // 2, hits // 2)
        assert total(None) == threads * hits
    finally:
        counter.detach()


def test_the_cores_clock_is_the_coarse_clocks_second(tmp_path):
    """tt_now_second() reads time() (one vDSO load) instead of
    clock_gettime(CLOCK_REALTIME_COARSE): it must be the same second, never
    another clock's (read for 1.2 s, so at least one second changes, each
    read between two coarse reads)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (apt-get install gcc)")
    out = tmp_path / "clock_bracket"
    subprocess.run([cc, "-O2", "-Wall", "-Werror", "-Wno-unused-function",
                    str(HERE / "c" / "clock_bracket.c"), "-o", str(out),
                    *c_paths("cflags").split()], check=True)
    samples, outside = map(int, subprocess.run([str(out), "1200"], capture_output=True,
                                               text=True, check=True).stdout.split())
    assert samples > 1000 and outside == 0, (samples, outside)


def test_the_attacher_follows_the_wall_clock_back(key, tmp_path):
    """The attacher's retry times are wall-clock seconds (tt_now_second):
    a worker that found no segment (next try 10 s later) and then sees the
    clock step back an hour (an NTP step at boot, a restored VM) tries
    again at its next hit once a segment is there, instead of waiting an
    hour for the clock to pass its last try (every hit lost meanwhile)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (apt-get install gcc)")
    out = tmp_path / "clock_back"
    subprocess.run([cc, "-O2", "-Wall", "-Werror", str(HERE / "c" / "clock_back.c"), "-o",
                    str(out), *c_paths("cflags").split(), *c_paths("libs").split()],
                   check=True)
    proc = subprocess.Popen([str(out), str(key)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        segment.install(key, "sysv")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "1\n"
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
