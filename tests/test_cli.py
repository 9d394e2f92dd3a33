"""The CLI over real segments and stores (click's CliRunner, in-process)."""
from __future__ import annotations

import json
import os
import socket
import struct
import time

import pytest
from click.testing import CliRunner

from test_segment import raw_view

from trafficthreshold import segment
from trafficthreshold.cli import main


@pytest.fixture
def cfg(tmp_path, key):
    path = tmp_path / "config.toml"
    path.write_text(f'key = {key}\ndatabase = "{tmp_path / "s.sqlite3"}"\n'
                    'timezone = "UTC"\n[http]\nenabled = false\n')
    return str(path)


def run(cfg, *args, ok=True):
    result = CliRunner().invoke(main, ["--config", cfg, *args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    return result.output


@pytest.mark.parametrize("backend", segment.BACKENDS)
def test_install_hit_status_uninstall(cfg, backend, key):
    out = run(cfg, "install", "--backend", backend, "--keys", "64", "--minutes", "30")
    assert f"installed: {backend} segment at key {key:#x}" in out
    assert "already installed" in run(cfg, "install", "--backend", backend, "--keys", "64",
                                      "--minutes", "30")
    run(cfg, "hit", "--backend", backend, "example.com", "-n", "3")
    run(cfg, "hit", "--backend", backend)
    info = json.loads(run(cfg, "status", "--backend", backend, "--json"))
    counts = {(k["account"], k["event"]): k["minute"] for k in info["keys"]}
    assert counts[("example.com", "pageview")] == 3
    assert counts[("all", "pageview")] == 4
    assert info["capacity"] == 64 and info["minutes"] == 30
    text = run(cfg, "status", "--backend", backend)
    assert "level 0 (0 - 59)" in text and "example.com" in text
    out = run(cfg, "uninstall", "--backend", backend)
    assert "rolled 4 pending hits" in out and "removed the" in out
    out = run(cfg, "stats", "example.com", "pageview", str(time.gmtime().tm_year))
    assert out.strip().endswith("3")
    assert "run `trafficthreshold install" in run(cfg, "status", "--backend", backend, ok=False)


def test_install_with_other_geometry_names_the_fix(cfg):
    run(cfg, "install", "--keys", "64")
    out = run(cfg, "install", "--keys", "128", ok=False)
    assert "--keys 64" in out and "uninstall" in out


def test_install_unknown_group(cfg):
    out = run(cfg, "install", "--group", "no-such-group-xyz", ok=False)
    assert "group 'no-such-group-xyz' does not exist" in out


def test_hit_rejects_bad_names(cfg):
    run(cfg, "install")
    assert "contains '/'" in run(cfg, "hit", "a/b", ok=False)
    assert "reserved" in run(cfg, "hit", "~x", ok=False)


def test_hit_without_segment_says_what_to_do(cfg):
    assert "trafficthreshold install" in run(cfg, "hit", "acme", ok=False)


def test_uninstall_refuses_while_attached(cfg, key):
    import subprocess
    import sys
    run(cfg, "install")
    worker = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from trafficthreshold import segment
c = segment.attach({key})
print("attached", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "attached"
        out = run(cfg, "uninstall", ok=False)
        assert "1 process is still attached" in out and str(worker.pid) in out
        assert "--force" in out
        assert "removed" in run(cfg, "uninstall", "--force")
    finally:
        worker.kill()
        worker.wait()


def test_config_check_names_key_value_and_fix(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[throttle]\nwindow = "hour"\nmultipler = 3\n')
    out = run(str(bad), "config", "check", ok=False)
    assert "throttle.window = 'hour'" in out and '"60s"' in out
    assert "multiplier" in out                       # the typo gets a suggestion


def test_config_check_and_show(cfg):
    assert "OK" in run(cfg, "config", "check")
    assert "[throttle]" in run(cfg, "config", "show")


def test_stats_before_any_rollup(cfg):
    assert "trafficthreshold run" in run(cfg, "stats", "acme", "pageview", "2026", ok=False)


def test_stats_never_writes_the_store(cfg, tmp_path):
    """A reader: a missing file is not created, an empty one gets no schema,
    and a read-only file in a read-only directory is read."""
    path = tmp_path / "s.sqlite3"
    assert "does not exist yet" in run(cfg, "stats", "acme", "pageview", "2026", ok=False)
    assert not path.exists()
    path.write_bytes(b"")
    assert "no period tables yet" in run(cfg, "stats", "acme", "pageview", "2026", ok=False)
    assert path.read_bytes() == b""
    from trafficthreshold.store import SQLiteStore
    path.unlink()
    with SQLiteStore(str(path), "UTC") as store:
        store.roll([("acme", "pageview", 1_800_000_000 // 60, 5)], 1_800_000_100)
    before = path.read_bytes()
    path.chmod(0o440)
    assert "total            5" in run(cfg, "stats", "acme", "pageview", "2027")
    assert path.read_bytes() == before


def test_a_damaged_store_is_one_line_naming_the_recovery(cfg, tmp_path):
    """`stats` and `alerts` on a database with damaged pages: one line that
    names the file and how to recover it, never a traceback."""
    from trafficthreshold.alerts.store import AlertStore
    from trafficthreshold.store import SQLiteStore
    path = tmp_path / "s.sqlite3"
    with SQLiteStore(str(path), "UTC") as store:
        store.roll([(f"a{i}", "pageview", 29_000_000 + i, 5) for i in range(2000)], now=1)
    AlertStore(str(path)).close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(bytes(range(256)) * ((size - 4096) // 256))
    for args in (("stats", "a1", "pageview", "2025"), ("alerts",)):
        out = run(cfg, *args, ok=False)
        assert "Traceback" not in out and ".recover" in out and str(path) in out, out


def test_stats_impossible_date(cfg, tmp_path):
    from trafficthreshold.store import SQLiteStore
    SQLiteStore(str(tmp_path / "s.sqlite3"), "UTC").close()
    out = run(cfg, "stats", "acme", "pageview", "2026", "2", "30", ok=False)
    assert "30" in out


def test_stats_json_zero_filled(cfg, tmp_path):
    from trafficthreshold.store import SQLiteStore
    with SQLiteStore(str(tmp_path / "s.sqlite3"), "UTC") as store:
        store.roll([("acme", "pageview", 1_800_000_000 // 60, 5)], 1_800_000_100)
    data = json.loads(run(cfg, "stats", "acme", "pageview", "2027", "1", "--json"))
    assert data["total"] == 5 and len(data["data"]) == 31


def test_systemd_unit_has_real_paths(cfg):
    out = run(cfg, "systemd-unit")
    assert "ExecStart=" in out and cfg in out


def test_test_mail_without_rules_or_recipients(cfg):
    assert "--to" in run(cfg, "test-mail", ok=False)


def test_test_mail_missing_sendmail(tmp_path, key):
    path = tmp_path / "c.toml"
    path.write_text(f'key = {key}\n[mail]\nsendmail = "{tmp_path}/nope"\n')
    out = run(str(path), "test-mail", "--to", "ops@example.com", ok=False)
    assert "install an MTA" in out


def test_alerts_lists_rules(tmp_path, key):
    path = tmp_path / "c.toml"
    path.write_text(f'key = {key}\ndatabase = "{tmp_path}/s.sqlite3"\n'
                    '[[alert]]\nname = "burst"\nthreshold = 5\nto = ["ops@example.com"]\n')
    out = run(str(path), "alerts")
    assert "burst" in out and "ok" in out
    assert json.loads(run(str(path), "alerts", "--json"))["rules"][0]["firing"] is False


def test_every_command_has_help_with_an_example():
    for name, command in main.commands.items():
        commands = getattr(command, "commands", {name: command})
        for sub in commands.values():
            assert sub.help and "Example:" in sub.help, name


def test_status_shows_policy_state_and_heartbeat(tmp_path, key):
    """A driven supervisor at level 2 cooling down: status says so."""
    from trafficthreshold import config as configuration
    from trafficthreshold.supervisor import Supervisor
    path = tmp_path / "config.toml"
    path.write_text(f'key = {key}\ndatabase = "{tmp_path / "s.sqlite3"}"\n'
                    '[http]\nenabled = false\n[throttle]\nmultiplier = 10\n')
    segment.install(key)
    now = time.time()
    sup = Supervisor(configuration.load(str(path), env={}), env={})
    sup.initialize(now - 100)
    sup.counter.hit(None, "pageview", 25, now - 90)
    sup.tick(now - 89)                     # level 2
    sup.tick(now - 20)                     # the window is empty: cooling down
    try:
        info = json.loads(run(str(path), "status", "--json"))
        assert info["throttle"]["supervisor_level"] == 2
        assert "steps down to 1 in 2" in info["throttle"]["policy_state"]
        assert info["supervisor"]["pid"] == os.getpid()
        assert "policy hysteresis: below level 2's floor" in run(str(path), "status")
    finally:
        sup.shutdown(now)


# ------------------------------------------- options before and after the command

def _all_commands():
    """(argv prefix, command) of every command, subcommands of groups included."""
    for name, command in main.commands.items():
        subs = getattr(command, "commands", None)
        if subs:
            yield [name], command
            for sub_name, sub in subs.items():
                yield [name, sub_name], sub
        else:
            yield [name], command


@pytest.mark.parametrize("argv", [a for a, _ in _all_commands()], ids=" ".join)
def test_config_and_verbose_accepted_after_every_command(argv):
    """`trafficthreshold run --config F -v` works like `--config F -v run`."""
    result = CliRunner().invoke(main, [*argv, "--help"])
    assert result.exit_code == 0, result.output
    assert "--config" in result.output and "-v, --verbose" in result.output


def test_config_after_the_command_is_used(tmp_path, key):
    path = tmp_path / "c.toml"
    path.write_text(f"key = {key}\n")
    result = CliRunner().invoke(main, ["config", "show", "--config", str(path), "-vv"],
                                env={"TRAFFICTHRESHOLD_KEY": ""})
    assert result.exit_code == 0, result.output
    assert f"key = {key:#x}" in result.output and str(path) in result.output
    # After the command wins over before it (the nearer one).
    other = tmp_path / "other.toml"
    other.write_text("key = 0x1234\n")
    result = CliRunner().invoke(main, ["--config", str(other), "config", "show", "--config",
                                       str(path)], env={"TRAFFICTHRESHOLD_KEY": ""})
    assert f"key = {key:#x}" in result.output


def test_run_with_config_after_the_command(tmp_path, key):
    """The reported bug: `run --config F` answered "No such option"; here it
    gets as far as reading F (a bad one, so it stops at once)."""
    path = tmp_path / "c.toml"
    path.write_text('[throttle]\nwindow = "hour"\n')
    result = CliRunner().invoke(main, ["run", "--config", str(path)])
    assert result.exit_code == 1
    assert "No such option" not in result.output and "throttle.window" in result.output


def test_verbose_after_the_command_turns_on_debug_logging(cfg):
    import logging
    CliRunner().invoke(main, ["config", "check", "--config", cfg, "-vv"],
                       catch_exceptions=False)
    assert logging.getLogger().level == logging.DEBUG
    CliRunner().invoke(main, ["config", "check", "--config", cfg], catch_exceptions=False)
    assert logging.getLogger().level == logging.WARNING


# --------------------------------------------------------------- key precedence

def test_key_precedence_flag_then_environment_then_file_then_default(tmp_path):
    """Where each status looks names its key: the flag wins over
    $TRAFFICTHRESHOLD_KEY, which wins over the file, which wins over the default."""
    flag, envkey, filekey = segment.unused_key(), segment.unused_key(), segment.unused_key()
    path = tmp_path / "c.toml"
    path.write_text(f"key = {filekey}\n")

    def looked_at(*args, env):
        result = CliRunner().invoke(main, ["--config", str(path), "status", *args], env=env)
        assert result.exit_code == 1 and "trafficthreshold install" in result.output
        return result.output

    assert f"{flag:#x}" in looked_at("--key", hex(flag), env={"TRAFFICTHRESHOLD_KEY": hex(envkey)})
    assert f"{envkey:#x}" in looked_at(env={"TRAFFICTHRESHOLD_KEY": hex(envkey)})
    assert f"{filekey:#x}" in looked_at(env={"TRAFFICTHRESHOLD_KEY": ""})
    path.write_text("")
    assert f"{segment.DEFAULT_KEY:#x}" in looked_at(env={"TRAFFICTHRESHOLD_KEY": ""})


def test_key_flag_wins_over_a_bad_environment_value(cfg, key):
    result = CliRunner().invoke(main, ["--config", cfg, "status", "--key", str(key)],
                                env={"TRAFFICTHRESHOLD_KEY": "nonsense"})
    assert f"{key:#x}" in result.output and "nonsense" not in result.output


def test_key_help_states_the_precedence():
    text = CliRunner().invoke(main, ["status", "--help"]).output
    assert "Default: $TRAFFICTHRESHOLD_KEY, then key in the config, then 0x54546831" in \
        " ".join(text.split())


def test_bad_key_flag_is_a_usage_error():
    result = CliRunner().invoke(main, ["status", "--key", "0"])
    assert result.exit_code == 2 and "not a segment key" in result.output


# ------------------------------------------------------------------- help text

@pytest.mark.parametrize("argv", [a for a, _ in _all_commands()], ids=" ".join)
def test_help_has_proper_metavars(argv):
    import re

    import click
    text = CliRunner().invoke(main, [*argv, "--help"]).output
    assert "_INT_AUTO" not in text and "LAMBDA" not in text.upper()
    command = dict((tuple(a), c) for a, c in _all_commands())[tuple(argv)]
    ctx = click.Context(command)
    for param in command.params:
        if isinstance(param, click.Option) and (param.is_flag or param.count):
            continue
        metavar = param.make_metavar(ctx)
        # A plain upper-case word (with "..." when repeated), a choice list or
        # a range; never a Python name.
        assert re.fullmatch(r"\[?[A-Z]+(\.\.\.)?( RANGE)?\]?|\[[a-z|]+\]", metavar), (
            param.name, metavar)
        assert metavar in text


def test_key_and_mode_metavars():
    assert "--key KEY" in CliRunner().invoke(main, ["install", "--help"]).output
    assert "--mode OCTAL" in CliRunner().invoke(main, ["install", "--help"]).output


# --------------------------------------------------------- numbers on the command line

def test_hit_n_too_large_is_a_usage_error_not_a_traceback(cfg):
    from trafficthreshold.cli import MAX_HIT_N
    run(cfg, "install")
    result = CliRunner().invoke(main, ["--config", cfg, "hit", "x", "pageview", "-n",
                                       "99999999999999999999"])
    assert result.exit_code == 2 and result.exception is not None
    assert "Traceback" not in result.output and str(MAX_HIT_N) in result.output
    run(cfg, "hit", "x", "pageview", "-n", str(MAX_HIT_N))
    info = json.loads(run(cfg, "status", "--json"))
    assert {(k["account"], k["minute"]) for k in info["keys"]} >= {("x", MAX_HIT_N)}


def _library_minimum_keys():
    for keys in range(1, 1 << 20):
        try:
            segment.Geometry(keys=keys).check()
            return keys
        except ValueError:
            continue


def test_install_keys_minimum_is_the_librarys(cfg):
    """The CLI takes the minimum from segment.Geometry's own check."""
    least = _library_minimum_keys()
    out = run(cfg, "install", "--keys", str(least - 1), ok=False)
    assert f"--keys {least - 1} is out of range" in out
    assert "installed" in run(cfg, "install", "--keys", str(least))


def test_install_world_writable_mode_warns(cfg):
    result = CliRunner().invoke(main, ["--config", cfg, "install", "--mode", "666"])
    assert result.exit_code == 0, result.output
    # The CLI's own words, or segment.install's (result.warnings) once it gives them.
    assert result.stderr.startswith("warning: ") and "666" in result.stderr
    result = CliRunner().invoke(main, ["--config", cfg, "install", "--mode", "660"])
    assert "warning" not in result.stderr


@pytest.mark.parametrize("mode", ["999", "1777", "rw"])
def test_install_bad_mode_is_a_usage_error(cfg, mode):
    result = CliRunner().invoke(main, ["--config", cfg, "install", "--mode", mode])
    assert result.exit_code == 2 and "--mode" in result.output


# ------------------------------------------------------- status on a damaged segment

def _status_both_ways(cfg, backend):
    """`status --json` and `status`: both succeed; returns (info, text)."""
    info = json.loads(run(cfg, "status", "--backend", backend, "--json"))
    text = run(cfg, "status", "--backend", backend)
    return info, text


def test_status_reports_a_corrupt_header_field(cfg, key, backend):
    run(cfg, "install", "--backend", backend)
    run(cfg, "hit", "--backend", backend, "acme", "-n", "2")
    with raw_view(key, backend) as view:
        struct.pack_into("=I", view, segment.H_THROTTLE_SLOT, 0xFFFFFFFF)
    info, text = _status_both_ways(cfg, backend)
    assert any("throttle_slot" in d and "0xffffffff" in d for d in info["damage"])
    assert "uninstall" in info["repair"]
    assert f"DAMAGED     header field throttle_slot (offset {segment.H_THROTTLE_SLOT})" in text
    assert {(k["account"], k["minute"]) for k in info["keys"]} >= {("acme", 2)}


def test_status_reports_a_name_that_is_not_utf8(cfg, key, backend):
    run(cfg, "install", "--backend", backend)
    run(cfg, "hit", "--backend", backend, "acme", "-n", "2")
    with raw_view(key, backend) as view:
        index = struct.unpack_from("=Q", view, segment.H_INDEX_OFFSET)[0]
        size = struct.unpack_from("=I", view, segment.H_INDEX_SIZE)[0]
        for i in range(size):
            entry = index + i * segment.INDEX_ENTRY_SIZE
            start = entry + segment.E_ACCOUNT
            if bytes(view[start:start + 4]) == b"acme":
                view[start] = 0xFF
                break
        else:
            raise AssertionError("no index entry for acme")
    info, text = _status_both_ways(cfg, backend)
    assert any("is not UTF-8" in d and "\\xffcme" in d for d in info["damage"])
    assert {(k["account"], k["minute"]) for k in info["keys"]} >= {("\\xffcme", 2),
                                                                    ("all", 2)}
    assert "DAMAGED" in text and "is not UTF-8" in text and "\\xffcme" in text


def test_status_of_a_healthy_segment_reports_no_damage(cfg, backend):
    run(cfg, "install", "--backend", backend)
    info, text = _status_both_ways(cfg, backend)
    assert info["damage"] == [] and info["repair"] is None and "DAMAGED" not in text


def test_status_pluralises_attached_processes(cfg, key):
    import subprocess
    import sys
    run(cfg, "install")
    assert "attached    0 other processes" in run(cfg, "status")
    workers = []
    try:
        for expected in ("1 other process\n", "2 other processes\n"):
            workers.append(subprocess.Popen([sys.executable, "-c", f"""
import time
from trafficthreshold import segment
c = segment.attach({key})
print("attached", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True))
            assert workers[-1].stdout.readline().strip() == "attached"
            assert f"attached    {expected}" in run(cfg, "status")
        out = run(cfg, "uninstall", "--force", "--no-rollup")
        assert "2 processes were still attached" in out
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


# ------------------------------------------------- every error is one clear line

def test_run_with_the_http_port_taken_names_address_and_fix(tmp_path, key):
    """A real daemon process: the port is taken by a socket bound first."""
    import socket
    import subprocess
    import sys
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    path = tmp_path / "c.toml"
    path.write_text(f'key = {key}\ndatabase = "{tmp_path / "s.sqlite3"}"\n'
                    f'[http]\nlisten = "127.0.0.1:{port}"\n')
    try:
        done = subprocess.run([sys.executable, "-m", "trafficthreshold.cli", "run",
                               "--config", str(path)], capture_output=True, text=True,
                              timeout=60)
    finally:
        taken.close()
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, done.stderr
    assert f"cannot serve the stats API on 127.0.0.1:{port}" in error[0]
    assert "already in use" in error[0]
    _names_the_listen_fixes(error[0], path)


def _names_the_listen_fixes(error, path):
    """The fixes: another [http] listen (in this file: the CLI's words; or
    "in the configuration": webserver.py's on main), or --no-http."""
    assert "[http] listen" in error and "--no-http" in error
    assert str(path) in error or "in the configuration" in error


def test_run_on_an_address_not_of_this_host_says_so(tmp_path, key):
    """192.0.2.1 (TEST-NET-1) is no local address: EADDRNOTAVAIL gets its own fix."""
    import subprocess
    import sys
    path = tmp_path / "c.toml"
    path.write_text(f'key = {key}\ndatabase = "{tmp_path / "s.sqlite3"}"\n'
                    f'[http]\nlisten = "192.0.2.1:8080"\ntoken = "{"ab" * 32}"\n')
    done = subprocess.run([sys.executable, "-m", "trafficthreshold.cli", "run",
                           "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, done.stderr
    assert "cannot serve the stats API on 192.0.2.1:8080" in error[0]
    assert "not one of this machine's" in error[0]
    _names_the_listen_fixes(error[0], path)


def _as_nobody(argv):
    """Run the CLI in a forked child that became the unprivileged user
    nobody (os.setuid): returns (exit code, output).  What the child reads
    of the package comes from a world-readable copy (tt_nobody): the clone
    may sit in a directory nobody cannot enter."""
    import pwd
    from tt_nobody import readable_package, use_readable_package
    nobody = pwd.getpwnam("nobody")
    readable_package()  # made by the parent: the child's copy is gone with it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read)
            use_readable_package()
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            result = CliRunner().invoke(main, argv)
            os.write(write, json.dumps([result.exit_code, result.output,
                                        repr(result.exception)]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the child failed"
    return json.loads(data)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create a root-owned segment")
def test_install_as_unprivileged_user_on_a_root_owned_segment(cfg, key, backend):
    """No config file for the child (nobody could not read pytest's tmp
    directory): the key comes from --key."""
    run(cfg, "install", "--backend", backend, "--mode", "600")   # as root; imports all
    names = (f"{key:#x}", segment.posix_name(key))
    for argv in (["install"], ["uninstall"], ["status"], ["hit", "acme"]):
        code, output, exception = _as_nobody([*argv, "--key", str(key), "--backend", backend])
        assert code == 1, (argv, output, exception)
        assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output
        # The CLI's words or the library's (segment raises SegmentError for
        # this on its own branch): the object, and the fix.
        assert output.startswith("Error: permission denied"), output
        assert any(name in output for name in names), output
        assert "group" in output, output
    segment.attach(key, backend).detach()     # still there, untouched


def test_missing_segment_and_missing_mta_and_bad_config_are_one_line(cfg, tmp_path, key):
    for args in (["status"], ["hit", "acme"], ["uninstall"]):
        result = CliRunner().invoke(main, ["--config", cfg, *args])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
        assert "trafficthreshold install" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text("key = [\n")
    result = CliRunner().invoke(main, ["--config", str(bad), "status"])
    assert result.exit_code == 1 and str(bad) in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_store_that_cannot_be_opened_is_one_line(tmp_path, key):
    path = tmp_path / "c.toml"
    (tmp_path / "a-file").write_text("not a directory")
    path.write_text(f'key = {key}\ndatabase = "{tmp_path}/a-file/s.sqlite3"\n')
    run(str(path), "install")
    result = CliRunner().invoke(main, ["--config", str(path), "uninstall"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "a-file" in result.output and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


@pytest.mark.parametrize("field, value, reason", [
    ("key_capacity", 0, "corrupt header"),
    ("layout_version", 7, "layout version 7"),
    ("state", 0xFFFFFFFF, "not fully installed"),
])
def test_status_reports_a_segment_the_library_will_not_attach(cfg, key, backend, field,
                                                             value, reason):
    """The raw header is shown with the library's reason and the fix; exit 0."""
    run(cfg, "install", "--backend", backend)
    offset, width = segment.HEADER_FIELDS[field]
    with raw_view(key, backend) as view:
        struct.pack_into("=I" if width == 4 else "=Q", view, offset, value)
    info, text = _status_both_ways(cfg, backend)
    assert info["header"][field] == value and info["keys"] == []
    assert any(reason in d for d in info["damage"])
    assert f"{field} {value:#x}" in text and "DAMAGED" in text and reason in text
    if field == "state":
        assert any("header field state" in d for d in info["damage"])
    # The advice works (a plain `uninstall --force` cannot roll up what it cannot read).
    repair = "trafficthreshold uninstall --force --no-rollup"
    assert f"`{repair}`" in info["repair"] and info["repair"] in text
    assert "removed" in run(cfg, *repair.split()[1:], "--backend", backend)
    assert "trafficthreshold install" in run(cfg, "status", "--backend", backend, ok=False)


def test_status_still_refuses_a_foreign_segment(cfg, key, backend):
    """Not ours (bad magic): the library's one-line error, no raw header."""
    run(cfg, "install", "--backend", backend)
    with raw_view(key, backend) as view:
        view[0:8] = b"NOTOURS!"
    out = run(cfg, "status", "--backend", backend, ok=False)
    assert "not trafficthreshold's" in out and len(out.strip().splitlines()) == 1


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become nobody")
def test_run_on_a_privileged_port_as_a_user_names_the_fix(key):
    """A user (nobody) may not listen on port 81: EACCES gets its own fix."""
    import pwd
    import shutil
    import tempfile
    from trafficthreshold import config as configuration
    from trafficthreshold.supervisor import Supervisor
    nobody = pwd.getpwnam("nobody")
    home = tempfile.mkdtemp(prefix="tt-nobody-")
    # A start as root first (own key, own store, any free port) imports
    # everything `run` needs: nobody may not read this interpreter's library.
    warm = segment.unused_key()
    warm_path = os.path.join(home, "warm.toml")
    with open(warm_path, "w") as file:
        file.write(f'key = {warm}\ndatabase = "{home}/warm/s.sqlite3"\n'
                   '[http]\nenabled = false\n')
    import importlib
    for module in ("trafficthreshold.api.app", "trafficthreshold.api.server"):  # http = true's
        importlib.import_module(module)
    sup = Supervisor(configuration.load(warm_path, env={}), env={})
    sup.initialize(time.time())
    sup.shutdown(time.time())
    segment.uninstall(warm, force=True)
    try:
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        os.chmod(home, 0o755)
        path = os.path.join(home, "c.toml")
        with open(path, "w") as file:
            file.write(f'key = {key}\ndatabase = "{home}/s.sqlite3"\n'
                       '[http]\nlisten = "127.0.0.1:81"\n')
        code, output, exception = _as_nobody(["run", "--config", path])
        assert code == 1 and "Traceback" not in output, (output, exception)
        error = [line for line in output.splitlines() if line.startswith("Error:")]
        assert len(error) == 1, (output, exception)
        assert "cannot serve the stats API on 127.0.0.1:81" in error[0]
        assert "ports below 1024 need privileges" in error[0]
        _names_the_listen_fixes(error[0], path)
    finally:
        shutil.rmtree(home)


# -- [store] backend = "redis" ------------------------------------------------

def _redis_cfg(tmp_path, key, port, extra=""):
    path = tmp_path / "redis.toml"
    path.write_text(f'key = {key}\ndatabase = "{tmp_path / "s.sqlite3"}"\n'
                    'timezone = "UTC"\n[http]\nenabled = false\n'
                    f'[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:{port}/0"\n'
                    f'host = "web1"\n{extra}')
    return str(path)


def test_config_check_says_whether_redis_answered(tmp_path, key, redis_server):
    from tt_redis import free_port
    assert "answered" in run(_redis_cfg(tmp_path, key, redis_server.port), "config", "check")
    out = run(_redis_cfg(tmp_path, key, free_port()), "config", "check", ok=False)
    assert "did not answer" in out and "ConnectionError" in out


def test_config_check_names_each_bad_store_key(tmp_path, key):
    path = tmp_path / "bad.toml"
    path.write_text('[store]\nbackend = "redis"\nurl = "redis://:secret@h:6379/0"\n'
                    'prefix = "a:b"\npassword_file = "/x"\npassword_env = "Y"\n')
    out = run(str(path), "config", "check", ok=False)
    assert "store.url = (hidden) holds a password" in out
    assert "store.prefix" in out and "store.password_env" in out
    assert "secret" not in out


def test_stats_reads_the_redis_store(tmp_path, key, redis_server):
    from trafficthreshold.store import redis as redisstore
    from zoneinfo import ZoneInfo
    store = redisstore.RedisStore(redis_server.client(), ZoneInfo("UTC"), "web1")
    store.roll([("acme", "pageview", 1_800_000_000 // 60, 5)], 1_800_000_100)
    cfg = _redis_cfg(tmp_path, key, redis_server.port)
    data = json.loads(run(cfg, "stats", "acme", "pageview", "2027", "1", "--json"))
    assert data["total"] == 5 and data["data"]["15"] == 5
    assert not (tmp_path / "s.sqlite3").exists()  # nothing read from SQLite


def test_store_migrate_then_a_rerun_adds_nothing(tmp_path, key, redis_server):
    from trafficthreshold.store import SQLiteStore
    with SQLiteStore(str(tmp_path / "s.sqlite3"), "UTC") as store:
        store.roll([("acme", "pageview", 1_800_000_000 // 60, 5),
                    ("all", "pageview", 1_800_000_000 // 60, 5)], 1_800_000_100,
                   closed_through=1_800_000_000 // 60)
    cfg = _redis_cfg(tmp_path, key, redis_server.port)
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    first = run(cfg, "store", "migrate", "--to", url)
    assert "8 hashes added to, 0 with nothing new, 10 hits" in first
    again = run(cfg, "store", "migrate", "--to", url)
    assert "0 hashes added to, 8 with nothing new, 0 hits" in again
    client = redis_server.client()
    assert client.hgetall("track:acme:pageview:2027") == {b"1": b"5"}
    assert int(client.hget("track~host:web1", "closed_through")) == 1_800_000_000 // 60
    data = json.loads(run(cfg, "stats", "all", "pageview", "2027", "--json"))
    assert data["total"] == 5


def test_status_shows_the_store(tmp_path, key, redis_server):
    cfg = _redis_cfg(tmp_path, key, redis_server.port)
    run(cfg, "install")
    info = json.loads(run(cfg, "status", "--json"))
    assert info["store"]["backend"] == "redis" and info["store"]["answered"]
    assert "answered, no roll yet" in run(cfg, "status")
    redis_server.kill()
    assert "DID NOT ANSWER" in run(cfg, "status")
    run(cfg, "uninstall", "--no-rollup")


def test_uninstall_rolls_into_the_redis_store(tmp_path, key, redis_server):
    cfg = _redis_cfg(tmp_path, key, redis_server.port)
    run(cfg, "install")
    run(cfg, "hit", "acme", "pageview", "-n", "6")
    out = run(cfg, "uninstall")
    assert "rolled 6 pending hits into redis redis://127.0.0.1" in out
    client = redis_server.client()
    year = time.gmtime().tm_year
    assert client.hgetall(f"track:acme:pageview:{year}") == {
        str(time.gmtime().tm_mon).encode(): b"6"}
    assert client.hget("track~host:web1", "instance_ended") is not None


def test_after_store_migrate_the_ring_is_not_rolled_twice(tmp_path, key, redis_server):
    """The handover: the SQLite store rolled part of the ring; after the
    migration, a roll of the same ring into Redis adds only what SQLite had
    not (the watermarks come along under the segment's instance)."""
    from zoneinfo import ZoneInfo
    from trafficthreshold.store.redis import RedisStore
    from trafficthreshold.rollup import Roller
    from trafficthreshold.store import SQLiteStore
    from conftest import remove_everything
    from trafficthreshold import _counter
    t0 = 1_800_000_000
    while True:  # an instance with the top bit set: SQLite stores it signed
        segment.install(key, "sysv", now=t0)
        counter = segment.attach(key, "sysv")
        if counter.load(segment.H_INSTANCE, 8) >= 2**63:
            break
        counter.detach()
        _counter._reset()
        remove_everything(key)
    try:
        counter.hit("acme", "pageview", 5, t0 + 5)
        counter.hit("acme", "pageview", 2, t0 + 65)
        with SQLiteStore(str(tmp_path / "s.sqlite3"), "UTC") as store:
            assert Roller(counter, store).roll(t0 + 70, include_current=True) == 7
        counter.hit("acme", "pageview", 3, t0 + 66)  # after SQLite's last roll
        cfg = _redis_cfg(tmp_path, key, redis_server.port)
        run(cfg, "store", "migrate", "--to", f"redis://127.0.0.1:{redis_server.port}/0")
        redis_store = RedisStore(redis_server.client(), ZoneInfo("UTC"), "web1")
        assert Roller(counter, redis_store).roll(t0 + 130) == 3
        assert redis_store.period("acme", "pageview", 2027)["total"] == 10
        assert redis_store.period("all", "pageview", 2027)["total"] == 10
    finally:
        counter.detach()


def test_store_migrate_refuses_while_the_daemon_writes_the_file(tmp_path, key, redis_server):
    """The supervisor of the segment runs (its pid in the header is alive):
    the file grows while it is read; refused, naming the pid and the fix."""
    import os
    from trafficthreshold.store import SQLiteStore
    with SQLiteStore(str(tmp_path / "s.sqlite3"), "UTC") as store:
        store.roll([("all", "pageview", 1_800_000_000 // 60, 5)], 1_800_000_100)
    cfg = _redis_cfg(tmp_path, key, redis_server.port)
    run(cfg, "install")
    counter = segment.attach(key, "sysv")
    try:
        counter.store(segment.H_SUPERVISOR_PID, 4, os.getpid())
        url = f"redis://127.0.0.1:{redis_server.port}/0"
        out = run(cfg, "store", "migrate", "--to", url, ok=False)
        assert f"pid {os.getpid()}" in out and "stop" in out
        assert not redis_server.client().keys("track:*")
        counter.store(segment.H_SUPERVISOR_PID, 4, 0)
        run(cfg, "store", "migrate", "--to", url)
        assert redis_server.client().hgetall("track:all:pageview:2027") == {b"1": b"5"}
    finally:
        counter.detach()
        run(cfg, "uninstall", "--no-rollup")


def test_store_migrate_names_the_redis_that_did_not_answer(cfg, tmp_path):
    """Issue #22 item 10: the one line named the SQLite file ("sqlite
    .../s.sqlite3 did not answer") and a fix the command never used
    ([store] url).  It names the --to URL, and what to check."""
    from trafficthreshold.store import SQLiteStore
    with SQLiteStore(str(tmp_path / "s.sqlite3"), "UTC") as store:
        store.roll([("acme", "pageview", 1_800_000_000 // 60, 5)], 1_800_000_100)
    with socket.socket() as s:          # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run(cfg, "store", "migrate", "--to", f"redis://127.0.0.1:{port}/0", ok=False)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    assert f"redis://127.0.0.1:{port}/0" in out and "--to" in out, out
    assert "s.sqlite3" not in out and "[store] url" not in out, out
    assert "run the command again" in out, out


def test_store_migrate_refuses_a_password_in_the_url(cfg, tmp_path):
    (tmp_path / "s.sqlite3").write_bytes(b"")
    out = run(cfg, "store", "migrate", "--to", "redis://:hunter2@127.0.0.1:1/0", ok=False)
    assert "password" in out and "hunter2" not in out


def test_status_shows_reclaimed_and_free_slots(cfg, key, backend):
    run(cfg, "install", "--backend", backend)
    counter = segment.attach(key, backend)
    now = time.time()
    counter.hit("gone.example", now=now - 300 * 60)
    counter.hit("gone2.example", now=now - 300 * 60)
    assert len(segment.reclaim(counter, now, int(now // 60) - 1)) == 2
    counter.hit("new.example", now=now)  # takes one of the two
    counter.store(segment.H_LOCK_TIMEOUTS, 8, 3)
    counter.detach()
    info, text = _status_both_ways(cfg, backend)
    assert info["lock_timeouts"] == 3
    assert "losses      overflow hits 0, dropped hits 0 (3 lock waits past 50 ms)" in text
    # keys_used: the slots ever handed out; in use: ~overflow, all, new.example.
    assert (info["reclaimed"], info["free_slots"], info["keys_used"]) == (2, 1, 4)
    assert "keys        3 of 1024 used" in text
    assert "reclaimed   2 idle keys' slots since the install, 1 free for new keys" in text
    assert info["damage"] == []


def test_a_redis_password_in_the_url_query_is_refused_and_never_printed(tmp_path, key):
    """?password= (redis-py uses it) is refused as user:pass@ is, by the
    config and by `store migrate --to`; a URL printed anyway is redacted."""
    from trafficthreshold.store import redis as redisstore
    path = tmp_path / "c.toml"
    for url in ("redis://h:6379/0?password=hunter2", "redis://h:6379/0?db=1&password=hunter2",
                "unix:///run/redis.sock?password=hunter2"):
        path.write_text(f'[store]\nbackend = "redis"\nurl = "{url}"\n')
        out = run(str(path), "config", "check", ok=False)
        assert "store.url = (hidden) holds a password" in out and "hunter2" not in out
    (tmp_path / "s.sqlite3").write_bytes(b"")
    cfg = _redis_cfg(tmp_path, key, 1)
    out = run(cfg, "store", "migrate", "--to", "redis://127.0.0.1:1/0?password=hunter2", ok=False)
    assert "password" in out and "hunter2" not in out
    for url in ("redis://u:hunter2@h:6379/0", "redis://h:6379/0?password=hunter2&db=2",
                "rediss://:hunter2@h/0"):
        shown = redisstore.redact_url(url)
        assert "hunter2" not in shown and "h" in shown
    assert redisstore.redact_url("redis://h:6379/0?db=2") == "redis://h:6379/0?db=2"


def test_every_spelling_of_a_password_in_a_redis_url_is_refused_and_redacted(tmp_path, key):
    """redis-py's parse_url hands every query argument to the connection
    (``password``, ``ssl_password``, percent-encoded names ...): each one
    that holds a secret, whatever its case or spelling, is refused by the
    config and by ``store migrate --to``, and never printed."""
    from trafficthreshold.store import redis as redisstore
    path = tmp_path / "c.toml"
    spellings = ("Password=hunter2", "PASSWORD=hunter2", "pass%77ord=hunter2",
                 "ssl_password=hunter2", "db=1&Passwd=hunter2", "password=hunter2&password=x",
                 "%50assword=hunter2")
    for query in spellings:
        url = f"redis://h:6379/0?{query}"
        path.write_text(f'[store]\nbackend = "redis"\nurl = "{url}"\n')
        out = run(str(path), "config", "check", ok=False)
        assert "store.url = (hidden) holds a password" in out and "hunter2" not in out, (query, out)
        shown = redisstore.redact_url(url)
        assert "hunter2" not in shown and "h:6379" in shown, (query, shown)
    (tmp_path / "s.sqlite3").write_bytes(b"")
    cfg = _redis_cfg(tmp_path, key, 1)
    for query in ("Password=hunter2", "ssl_password=hunter2", "pass%77ord=hunter2"):
        out = run(cfg, "store", "migrate", "--to", f"redis://127.0.0.1:1/0?{query}", ok=False)
        assert "password" in out and "hunter2" not in out, (query, out)
    # A URL with a user name but no password still says nothing secret.
    assert "hunter2" not in redisstore.redact_url("redis://hunter2@h:6379/0")
    assert redisstore.redact_url("redis://h:6379/0?db=2&protocol=3") == \
        "redis://h:6379/0?db=2&protocol=3"
