"""Tests of the systemd unit (systemd/ and its package-data copy) and render_unit."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from trafficthreshold import systemd

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "systemd" / systemd.UNIT_NAME
PACKAGE_DATA = ROOT / "trafficthreshold" / "data" / systemd.UNIT_NAME


def _directives(text: str) -> dict[str, list[str]]:
    """Directive name -> values, in file order."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            name, _, value = line.partition("=")
            found.setdefault(name, []).append(value)
    return found


def _fake_program(tmp_path: Path, name: str = "trafficthreshold") -> str:
    program = tmp_path / "venv bin" / name
    program.parent.mkdir(parents=True, exist_ok=True)
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(program)


@pytest.mark.parametrize("name", systemd.UNITS)
def test_package_data_is_a_copy_of_the_shipped_unit(name: str) -> None:
    """Both units (the daemon's, the bus subscriber's template) reach a pip
    install as package data, identical to systemd/."""
    shipped = ROOT / "systemd" / name
    assert (ROOT / "trafficthreshold" / "data" / name).read_bytes() == shipped.read_bytes(), (
        f"cp systemd/{name} trafficthreshold/data/"
    )
    assert systemd.shipped_unit(name) == shipped.read_text()
    assert systemd.shipped_unit() == SHIPPED.read_text()


def test_the_unit_has_the_settings_the_deployment_needs() -> None:
    unit = _directives(SHIPPED.read_text())
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "ExecStartPre": ["/usr/local/bin/trafficthreshold install"],
        "ExecStart": ["/usr/local/bin/trafficthreshold run"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "WatchdogSec": ["30"],
        "Restart": ["on-failure"],
        "RestartSec": ["2"],
        "User": ["trafficthreshold"],
        "Group": ["www-data"],
        "StateDirectory": ["trafficthreshold"],
        "RemoveIPC": ["no"],
    }
    assert {name: unit.get(name) for name in expected} == expected
    # Each of these would break the shared segment or setgid postdrop.
    for forbidden in (
        "DynamicUser",
        "PrivateIPC",
        "NoNewPrivileges",
        "PrivateDevices",
        "SystemCallFilter",
        "RestrictNamespaces",
    ):
        assert forbidden not in unit


def test_every_directive_is_commented() -> None:
    """ "Commented line by line": a comment above every setting."""
    lines = SHIPPED.read_text().splitlines()
    for number, line in enumerate(lines):
        if line and not line.startswith(("#", "[")):
            assert lines[number - 1].startswith("#"), (
                f"line {number + 1} ({line}) has no comment above it"
            )


def test_the_comments_explain_what_is_left_out() -> None:
    text = SHIPPED.read_text()
    for word in ("DynamicUser=", "PrivateIPC=", "NoNewPrivileges=", "postdrop", "RemoveIPC=yes"):
        assert word in text


def test_render_unit_writes_the_real_paths(tmp_path: Path) -> None:
    program = _fake_program(tmp_path)
    unit = systemd.render_unit(program, "/srv/tt/config.toml")
    directives = _directives(unit)
    quoted = '"' + program + '"'  # the path has a space
    assert directives["ExecStartPre"] == [f"{quoted} install"]
    assert directives["ExecStart"] == [f"{quoted} run"]
    assert directives["Environment"] == ["TRAFFICTHRESHOLD_CONFIG=/srv/tt/config.toml"]
    assert "/usr/local/bin/trafficthreshold install" not in unit


def test_render_unit_escapes_specifiers_and_dollars() -> None:
    unit = systemd.render_unit("/opt/100%/$x/trafficthreshold", "/etc/a b/config.toml")
    directives = _directives(unit)
    assert directives["ExecStart"] == ["/opt/100%%/$$x/trafficthreshold run"]
    assert directives["Environment"] == ['"TRAFFICTHRESHOLD_CONFIG=/etc/a b/config.toml"']


def test_render_unit_defaults_to_this_installation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    program = _fake_program(tmp_path)
    monkeypatch.setenv("PATH", os.path.dirname(program))
    assert systemd.installed_bin() == program
    unit = systemd.render_unit()
    assert _directives(unit)["Environment"] == [
        "TRAFFICTHRESHOLD_CONFIG=/etc/trafficthreshold/config.toml"
    ]
    assert program in unit


def test_render_unit_keeps_a_home_directory_readable() -> None:
    assert _directives(systemd.render_unit("/usr/bin/tt"))["ProtectHome"] == ["yes"]
    unit = systemd.render_unit("/home/alice/venv/bin/trafficthreshold")
    assert _directives(unit)["ProtectHome"] == ["read-only"]
    unit = systemd.render_unit("/usr/bin/tt", "/root/tt.toml")
    assert _directives(unit)["ProtectHome"] == ["read-only"]


@pytest.mark.parametrize("path", ["relative/trafficthreshold", "/usr/bin/tt\nExecStart=/bin/sh"])
def test_render_unit_refuses_paths_systemd_cannot_take(path: str) -> None:
    with pytest.raises(ValueError, match="absolute path"):
        systemd.render_unit(path)


def _systemd_analyze() -> str:
    """systemd-analyze's path; REQUIRE_SYSTEMD_ANALYZE=1 turns a skip into a failure."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("REQUIRE_SYSTEMD_ANALYZE"):
            pytest.fail("systemd-analyze is required (REQUIRE_SYSTEMD_ANALYZE) but not installed")
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    return analyze


def test_systemd_analyze_verify_accepts_the_rendered_unit(tmp_path: Path) -> None:
    """systemd-analyze verify; REQUIRE_SYSTEMD_ANALYZE=1 turns a skip into a failure."""
    analyze = _systemd_analyze()
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    unit_file = unit_dir / systemd.UNIT_NAME
    unit_file.write_text(
        systemd.render_unit(_fake_program(tmp_path), "/etc/trafficthreshold/config.toml")
    )
    result = subprocess.run(
        [analyze, "verify", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    # Unknown or misspelt settings are only warnings ("ignoring"): fail on
    # any line about our file, not just on the exit status.
    ours = [
        line for line in (result.stdout + result.stderr).splitlines() if systemd.UNIT_NAME in line
    ]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


@pytest.mark.parametrize("program", ["/tmp/tt-venv/bin/trafficthreshold",
                                     "/var/tmp/tt/bin/trafficthreshold"])
def test_render_unit_under_tmp_drops_private_tmp_and_says_why(program: str) -> None:
    """PrivateTmp=yes gives the service an empty /tmp: ExecStart=/tmp/... would
    not exist there."""
    unit = systemd.render_unit(program, "/etc/trafficthreshold/config.toml")
    assert _directives(unit)["PrivateTmp"] == ["no"]
    assert f"ExecStart={program} run" in unit
    lines = unit.splitlines()
    above = lines[lines.index("PrivateTmp=no") - 1]
    assert above.startswith("# ") and "PrivateTmp=yes" in above
    assert "PrivateTmp=yes would replace" in unit
    assert systemd.warnings(program) and "PrivateTmp=no" in systemd.warnings(program)[0]


def test_render_unit_config_under_tmp_drops_private_tmp() -> None:
    unit = systemd.render_unit("/usr/local/bin/trafficthreshold", "/tmp/tt/config.toml")
    assert _directives(unit)["PrivateTmp"] == ["no"]
    assert "/tmp/tt/config.toml" in systemd.warnings("/usr/bin/tt", "/tmp/tt/config.toml")[0]


def test_render_unit_elsewhere_keeps_private_tmp() -> None:
    for program in ("/usr/local/bin/trafficthreshold", "/opt/tmp/bin/trafficthreshold",
                    "/srv/tmpfoo/bin/trafficthreshold"):
        assert _directives(systemd.render_unit(program))["PrivateTmp"] == ["yes"], program
        assert systemd.warnings(program, "/etc/trafficthreshold/config.toml") == []


def test_cli_systemd_unit_under_tmp_warns(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from trafficthreshold.cli import main
    config = tmp_path / "config.toml"
    config.write_text("")
    result = CliRunner().invoke(main, ["systemd-unit", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "PrivateTmp=no" in result.stdout and "PrivateTmp=yes\n" not in result.stdout
    assert result.stderr.startswith("warning: ") and "reboot" in result.stderr


# ----------------------------------------- the bus subscriber's template unit

SUBSCRIBE = ROOT / "systemd" / "trafficthreshold-subscribe@.service"


def test_the_subscriber_unit_is_notify_with_a_watchdog_and_the_daemons_hardening() -> None:
    unit, daemon = _directives(SUBSCRIBE.read_text()), _directives(SHIPPED.read_text())
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "ExecStart": ["/usr/local/bin/trafficthreshold subscribe --name %i $ADDRESSES $OPTIONS"],
        "EnvironmentFile": ["/etc/trafficthreshold/subscribe-%i.env"],
        "WatchdogSec": ["30"],
        "Restart": ["on-failure"],
        "NoNewPrivileges": ["yes"],
    }
    assert {name: unit.get(name) for name in expected} == expected
    for same in ("User", "Group", "UMask", "Environment", "StateDirectory",
                 "StateDirectoryMode", "RemoveIPC", "ProtectSystem", "PrivateTmp",
                 "ProtectHome"):
        assert unit[same] == daemon[same], same
    assert "trafficthreshold.service" in unit["After"]
    for forbidden in ("DynamicUser", "PrivateIPC", "PrivateDevices"):
        assert forbidden not in unit
    lines = SUBSCRIBE.read_text().splitlines()
    for number, line in enumerate(lines):
        if line and not line.startswith(("#", "[")):
            assert lines[number - 1].startswith("#"), f"line {number + 1} has no comment"


def test_the_subscriber_watchdog_is_kept_by_the_loop(tmp_path: Path) -> None:
    """The loop wakes at least twice a second (poll or select timeout) and
    sends WATCHDOG=1 at half WatchdogSec: a real datagram socket stands in
    for systemd's NOTIFY_SOCKET, and `subscribe -` runs with stdin open and
    silent."""
    import json
    import socket
    import sys
    import time
    sock_path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(10)
    config = tmp_path / "config.toml"
    config.write_text(f'key = 1\ndatabase = "{tmp_path}/stats.sqlite3"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAFFICTHRESHOLD_")}
    env.update(NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="1000000", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "trafficthreshold.cli", "--config",
                             str(config), "subscribe", "-", "--name", "dog"], env=env,
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        got = [listener.recv(4096).decode() for _ in range(4)]
        assert got[0] == "READY=1"
        assert sum("WATCHDOG=1" in g for g in got[1:]) == 3, got
        proc.stdin.close()  # the end of the input: a clean stop
        assert proc.wait(10) == 0
        assert "STOPPING=1" in listener.recv(4096).decode()
        info = json.loads((tmp_path / "subscribers" / "dog.json").read_text())
        assert info["stopped"] and info["updated_at"] <= time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        listener.close()


def test_systemd_analyze_verify_accepts_the_subscriber_unit(tmp_path: Path) -> None:
    """An instance of the template, beside the daemon's unit it is ordered after."""
    analyze = _systemd_analyze()
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    program = _fake_program(tmp_path)
    (unit_dir / systemd.UNIT_NAME).write_text(
        systemd.render_unit(program, "/etc/trafficthreshold/config.toml"))
    instance = unit_dir / "trafficthreshold-subscribe@shop.service"
    instance.write_text(systemd.render_unit(program, "/etc/trafficthreshold/config.toml",
                                            unit=systemd.SUBSCRIBER_UNIT_NAME))
    result = subprocess.run(
        [analyze, "verify", str(instance)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"}, cwd=unit_dir)
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if "trafficthreshold" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def test_cli_systemd_unit_subscriber_renders_the_template_with_this_installation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pip install` users get the subscriber's unit in one command, as the
    daemon's: `trafficthreshold systemd-unit --subscriber`, with the paths
    of this installation (program and config) written in."""
    from click.testing import CliRunner

    from trafficthreshold.cli import main
    program = _fake_program(tmp_path)
    monkeypatch.setenv("PATH", os.path.dirname(program))
    result = CliRunner().invoke(main, ["systemd-unit", "--subscriber", "--config",
                                       "/srv/tt/config.toml"])
    assert result.exit_code == 0, result.output
    unit = _directives(result.stdout)
    assert unit["ExecStart"] == [f'"{program}" subscribe --name %i $ADDRESSES $OPTIONS']
    assert unit["Environment"] == ["TRAFFICTHRESHOLD_CONFIG=/srv/tt/config.toml"]
    assert unit["EnvironmentFile"] == ["/etc/trafficthreshold/subscribe-%i.env"]
    assert unit["Type"] == ["notify"] and "ExecStartPre" not in unit
    assert "systemd-unit --subscriber" in SUBSCRIBE.read_text()  # its install note says so
    daemon = CliRunner().invoke(main, ["systemd-unit", "--config", "/srv/tt/config.toml"])
    assert _directives(daemon.stdout)["ExecStart"] == [f'"{program}" run']
