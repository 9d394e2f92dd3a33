"""The command line: click commands, each a few lines over a module.

Library errors (``TrafficThresholdError``) become ``click.ClickException``
with the library's message, which already says what to do.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
from typing import Any, Callable

import click

from . import config as configuration
from . import segment
from .errors import TrafficThresholdError

log = logging.getLogger("trafficthreshold.cli")


def _fail_clearly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one-line messages (exit 1)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (TrafficThresholdError, ValueError, PermissionError) as exc:
            raise click.ClickException(str(exc)) from exc
    return wrapper


def _int_auto(value: str) -> int:
    return int(value, 0)


def _load(ctx: click.Context) -> configuration.Config:
    """The configuration, with --key/--backend applied over it."""
    obj = ctx.ensure_object(dict)
    if "config" not in obj:
        cfg = configuration.load(obj.get("config_path"))
        overrides = {k: obj[k] for k in ("key", "backend") if obj.get(k) is not None}
        obj["config"] = cfg if not overrides else dataclasses.replace(cfg, **overrides)
    return obj["config"]


def segment_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--key and --backend, for every command that touches the segment."""
    @click.option("--key", type=_int_auto, default=None,
                  help="SysV IPC key (decimal or 0x hex). Default: config, then "
                       "$TRAFFICTHRESHOLD_KEY, then 0x54546831.")
    @click.option("--backend", type=click.Choice(segment.BACKENDS), default=None,
                  help="sysv (default) or posix shared memory.")
    @click.pass_context
    @functools.wraps(fn)
    def wrapper(ctx: click.Context, key: int | None, backend: str | None, **kw: Any) -> Any:
        obj = ctx.ensure_object(dict)
        if key is not None:
            obj["key"] = key
        if backend is not None:
            obj["backend"] = backend
        return ctx.invoke(fn, **kw)
    return wrapper


@click.group()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              envvar="TRAFFICTHRESHOLD_CONFIG",
              help="TOML config file (default /etc/trafficthreshold/config.toml if present).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="trafficthreshold")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, verbose: int) -> None:
    """Count page views across web workers; alert by mail on bursts.

    Example: trafficthreshold install && trafficthreshold run
    """
    ctx.ensure_object(dict)["config_path"] = config_path
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(name)s: %(message)s")


# ----------------------------------------------------------------- segment

@main.command()
@segment_options
@click.option("--keys", type=click.IntRange(18, 1 << 20), default=1024, show_default=True,
              help="Capacity of the key table ((account, event) pairs).")
@click.option("--minutes", type=click.IntRange(2, 100000), default=120, show_default=True,
              help="Minutes of history kept in the ring.")
@click.option("--stripes", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Copies of each counter, so workers do not share a cache line.")
@click.option("--mode", type=lambda v: int(v, 8), default="660", show_default=True,
              help="Permissions (octal) of the segment and semaphore.")
@click.option("--group", default=None, help="Group that may use the segment, e.g. www-data.")
@click.pass_context
@_fail_clearly
def install(ctx: click.Context, keys: int, minutes: int, stripes: int, mode: int,
            group: str | None) -> None:
    """Create the shared-memory segment (idempotent).

    Example: trafficthreshold install --group www-data
    """
    cfg = _load(ctx)
    geometry = segment.Geometry(keys=keys, minutes=minutes, stripes=stripes)
    result = segment.install(cfg.key, cfg.backend, geometry, mode=mode, group=group,
                             multiplier=cfg.throttle.multiplier, window=cfg.throttle.window)
    verb = "installed" if result.created else "already installed"
    click.echo(f"{verb}: {cfg.backend} segment at key {cfg.key:#x}, {result.size:,} bytes, "
               f"{result.geometry.keys} keys, {result.geometry.minutes} minutes, "
               f"mode {mode:o}" + (f", group {group}" if group else ""))


@main.command()
@segment_options
@click.option("--force", is_flag=True, help="Remove even while processes are attached.")
@click.option("--no-rollup", is_flag=True,
              help="Do not roll pending counts into the store first (they are lost).")
@click.pass_context
@_fail_clearly
def uninstall(ctx: click.Context, force: bool, no_rollup: bool) -> None:
    """Roll pending counts into the store, then remove segment and semaphore.

    Example: trafficthreshold uninstall
    """
    cfg = _load(ctx)
    before = None if no_rollup else functools.partial(_final_rollup, cfg)
    result = segment.uninstall(cfg.key, cfg.backend, force=force, before_remove=before)
    click.echo(f"removed the {result['removed']} ({result['size']:,} bytes)")


def _final_rollup(cfg: configuration.Config, counter: Any) -> None:
    from .rollup import Roller
    from .store import Store
    with Store(cfg.database, cfg.timezone) as store:
        added = Roller(counter, store).roll(time.time(), include_current=True)
    click.echo(f"rolled {added} pending hits into {cfg.database}")


@main.command()
@segment_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@_fail_clearly
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the segment, its keys and counts, and the throttle level.

    Example: trafficthreshold status --json
    """
    from .status import collect, render
    cfg = _load(ctx)
    info = collect(cfg, time.time())
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


@main.command()
@segment_options
@click.argument("account", required=False)
@click.argument("event", required=False, default="pageview")
@click.option("-n", type=click.IntRange(min=1), default=1, show_default=True, help="How many.")
@click.pass_context
@_fail_clearly
def hit(ctx: click.Context, account: str | None, event: str, n: int) -> None:
    """Count hits from the shell (and so from PHP, cron, any language).

    ACCOUNT "all" or omitted counts only the total.

    Example: trafficthreshold hit example.com pageview -n 3
    """
    cfg = _load(ctx)
    counter = segment.attach(cfg.key, cfg.backend)
    counter.hit(None if account in (None, "all") else account, event, n)


# ------------------------------------------------------------------ daemon

@main.command()
@click.option("--no-http", is_flag=True, help="Do not serve the stats API and dashboard.")
@click.pass_context
@_fail_clearly
def run(ctx: click.Context, no_http: bool) -> None:
    """Run the supervisor: throttle level, alerts, roll-ups, HTTP API.

    Example: trafficthreshold run --no-http
    """
    from .supervisor import Supervisor
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    cfg = _load(ctx)
    sup = Supervisor(cfg, config_path=ctx.obj.get("config_path"), http=not no_http)
    sys.exit(sup.run())


@main.group("config")
def config_group() -> None:
    """Check or show the configuration."""


@config_group.command("check")
@click.pass_context
@_fail_clearly
def config_check(ctx: click.Context) -> None:
    """Validate the config file; name each bad key, its value and the fix.

    Example: trafficthreshold --config /etc/trafficthreshold/config.toml config check
    """
    cfg = _load(ctx)
    for warning in configuration.warnings(cfg):
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{cfg.source}: OK")


@config_group.command("show")
@click.pass_context
@_fail_clearly
def config_show(ctx: click.Context) -> None:
    """Print the effective configuration as TOML (secrets hidden).

    Example: trafficthreshold config show
    """
    click.echo(configuration.dump(_load(ctx)), nl=False)


@main.command("systemd-unit")
@click.pass_context
def systemd_unit(ctx: click.Context) -> None:
    """Print the systemd unit with this installation's paths.

    Example: trafficthreshold systemd-unit > /etc/systemd/system/trafficthreshold.service
    """
    from .systemd import render_unit
    path = ctx.obj.get("config_path") or configuration.DEFAULT_PATH
    click.echo(render_unit(config_path=os.path.abspath(path)), nl=False)


# ------------------------------------------------------------------- stats

@main.command()
@click.argument("account")
@click.argument("event")
@click.argument("year", type=int)
@click.argument("month", type=int, required=False)
@click.argument("day", type=int, required=False)
@click.argument("hour", type=int, required=False)
@click.option("--json", "as_json", is_flag=True, help="The stats API's JSON.")
@click.pass_context
@_fail_clearly
def stats(ctx: click.Context, account: str, event: str, year: int, month: int | None,
          day: int | None, hour: int | None, as_json: bool) -> None:
    """Counts of a period from the store: a year's months, a month's days,
    a day's hours or an hour's minutes (zero-filled).

    Example: trafficthreshold stats example.com pageview 2026 11
    """
    from .store import Store
    cfg = _load(ctx)
    if not os.path.exists(cfg.database):
        raise click.ClickException(f"no store at {cfg.database} yet: start the daemon "
                                   "(trafficthreshold run) so it rolls counts into it")
    with Store(cfg.database, cfg.timezone) as store:
        result = store.period(account, event, year, month, day, hour)
    if as_json:
        click.echo(json.dumps({"account": account, "event": event, "year": year,
                               "month": month, "day": day, "hour": hour, **result}))
        return
    label = "-".join(f"{v:02d}" for v in (year, month, day) if v is not None)
    click.echo(f"{account} {event} {label}" + (f" {hour:02d}h" if hour is not None else ""))
    for segment_no, n in result["data"].items():
        click.echo(f"{segment_no:>4}  {n:>12,}")
    click.echo(f"total {result['total']:>12,}")


# ------------------------------------------------------------------- mail

@main.command("test-mail")
@click.option("--rule", default=None, help="Render the mail of this [[alert]] rule.")
@click.option("--to", "to", multiple=True, help="Send here instead of the rule's recipients.")
@click.pass_context
@_fail_clearly
def test_mail(ctx: click.Context, rule: str | None, to: tuple[str, ...]) -> None:
    """Send a sample alert through the configured transport.

    Example: trafficthreshold test-mail --to ops@example.com
    """
    from .mailer import send_test
    cfg = _load(ctx)
    chosen = None
    if rule is not None:
        chosen = next((r for r in cfg.alerts if r.name == rule), None)
        if chosen is None:
            known = ", ".join(r.name for r in cfg.alerts) or "none configured"
            raise click.ClickException(f"no [[alert]] named {rule!r} (known: {known})")
    elif cfg.alerts:
        chosen = cfg.alerts[0]
    if chosen is None and not to:
        raise click.ClickException("no [[alert]] rules in the config: name recipients "
                                   "with --to ops@example.com")
    result = send_test(cfg.mail, chosen, to=to)
    if not result.ok:
        raise click.ClickException(result.message)
    click.echo(result.message)


@main.command("alerts")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@_fail_clearly
def alerts_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the alert rules, their episodes and the mail queue.

    Example: trafficthreshold alerts --json
    """
    from .status import alert_report, render_alerts
    cfg = _load(ctx)
    report = alert_report(cfg)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render_alerts(report))


if __name__ == "__main__":  # pragma: no cover
    main()
