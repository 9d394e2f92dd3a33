"""The command line: click commands, each a few lines over a module.

Every error of normal use becomes a one-line ``click.ClickException``
(exit 1) that names the problem and the fix, not a traceback (an error that
is a bug still raises, see :func:`_message`): library
errors (``TrafficThresholdError``) keep their message, which already says
what to do; permission errors, a taken HTTP port and store errors get one
here (:func:`_fail_clearly`).

``--config`` and ``-v`` are accepted before and after the command name
(``trafficthreshold --config F run`` and ``trafficthreshold run --config F``).
The segment key is taken from ``--key``, then ``$TRAFFICTHRESHOLD_KEY``,
then ``key`` in the config file, then the built-in 0x54546831.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import sys
import time
from typing import Any, Callable

import click
import posix_ipc
import sysv_ipc

from . import config as configuration
from . import segment
from .errors import TrafficThresholdError
from .subscribe import DEFAULT_HWM, DEFAULT_MAX_SIZE

log = logging.getLogger("trafficthreshold.cli")

#: The largest ``hit -n``: the documented maximum per call of hit().
MAX_HIT_N: int = segment.MAX_HIT_N


def _plural(n: int, one: str, many: str) -> str:
    """``1 process``, ``2 processes``."""
    return f"{n} {one if n == 1 else many}"


def _segment_name(cfg: configuration.Config | None) -> str:
    if cfg is None:
        return "the segment"
    if cfg.backend == "posix":
        return f"the POSIX segment /dev/shm{segment.posix_name(cfg.key)}"
    return f"the SysV segment at key {cfg.key:#x} (ipcs -m)"


def _permission_message(exc: BaseException) -> str:
    """Who was refused what, and the fix.  (sysv_ipc's own text is left out:
    it names no object and says "Permission %o" literally.)"""
    import pwd
    obj = click.get_current_context(silent=True)
    cfg = (obj.obj or {}).get("config") if obj is not None else None
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = f"uid {os.geteuid()}"
    return (f"permission denied to user {user} on {_segment_name(cfg)}: run this as the "
            "segment's owner or root, or as a member of its group "
            "(`trafficthreshold install --group GROUP` sets it; `trafficthreshold status` "
            "shows owner, group and mode)")


def _oserror_message(exc: OSError) -> str:
    if isinstance(exc, PermissionError) and exc.filename is None:
        return _permission_message(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}: check the path and this user's rights to it"


def _fail_clearly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every error a user can meet into a one-line message (exit 1);
    the traceback goes to the debug log (-vv)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as exc:
            message = _message(exc)
            if message is None:
                raise
            log.debug("%s failed", fn.__name__, exc_info=True)
            raise click.ClickException(message) from exc
    return wrapper


def _message(exc: Exception) -> str | None:
    """The one line for ``exc``, or None for an error that is a bug."""
    if isinstance(exc, (TrafficThresholdError, ValueError)):
        return str(exc)
    if isinstance(exc, (sysv_ipc.PermissionsError, posix_ipc.PermissionsError)):
        return _permission_message(exc)
    from .store import file_problem, location, unreachable
    # A sqlite3 error names the recovery: .recover, ...
    problem = file_problem(exc, lambda: getattr(
        (click.get_current_context().obj or {}).get("config"), "database", "the store"))
    if problem is not None:
        return problem
    if unreachable(exc):  # redis-py's errors, Sentinel's too
        obj = click.get_current_context().obj or {}
        cfg = obj.get("config")
        where = location(cfg) if cfg is not None else "the Redis store"
        return (f"{where} did not answer ({type(exc).__name__}: {exc}): check that Redis "
                "runs and [store] url, sentinels, service and the password")
    if isinstance(exc, OSError):
        return _oserror_message(exc)
    return None


class KeyType(click.ParamType):
    """A segment key: decimal or 0x hex, 1..2**31-1 (as in the config)."""

    name = "KEY"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        try:
            return configuration.parse_key(str(value))
        except ValueError as exc:
            self.fail(f"{value!r} is not a segment key ({exc}); use decimal or 0x hex, "
                      "e.g. 0x54546831", param, ctx)


class OctalMode(click.ParamType):
    """Permissions in octal, 0..777."""

    name = "OCTAL"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        try:
            mode = int(str(value), 8)
        except ValueError:
            self.fail(f"{value!r} is not an octal mode; write it like 660", param, ctx)
        if not 0 <= mode <= 0o777:
            self.fail(f"{value!r} is out of range; use 000..777 (e.g. 660)", param, ctx)
        return mode


def _geometry_check(field: str) -> Callable[[click.Context, Any, int], int]:
    """An option callback that applies ``segment.Geometry``'s own check, so
    the CLI accepts exactly what the library does (one source of truth)."""
    def check(ctx: click.Context, param: Any, value: int) -> int:
        try:
            dataclasses.replace(segment.Geometry(), **{field: value}).check()
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        return value
    return check


def _load(ctx: click.Context) -> configuration.Config:
    """The configuration, with --backend applied over it.  --key is applied
    as ``$TRAFFICTHRESHOLD_KEY`` (see :func:`_env`) so that the config
    module's single rule decides: flag, environment, file, default."""
    obj = ctx.ensure_object(dict)
    if "config" not in obj:
        cfg = configuration.load(obj.get("config_path"), _env(ctx))
        if obj.get("backend") is not None:
            cfg = dataclasses.replace(cfg, backend=obj["backend"])
        obj["config"] = cfg
    return obj["config"]


def _env(ctx: click.Context) -> dict[str, str]:
    """The environment, with ``--key`` (when given) as ``$TRAFFICTHRESHOLD_KEY``:
    the flag wins over the environment, which wins over the file.  The
    daemon gets this environment too, so a reload (SIGHUP) keeps the flag."""
    env = dict(os.environ)
    key = ctx.ensure_object(dict).get("key")
    if key is not None:
        env["TRAFFICTHRESHOLD_KEY"] = f"{key:#x}"
    return env


def _set_config(ctx: click.Context, param: Any, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(dict)["config_path"] = value


def _set_verbosity(ctx: click.Context, param: Any, value: int) -> None:
    """-v counts add up wherever they are given (before or after the command)."""
    obj = ctx.ensure_object(dict)
    obj["verbose"] = obj.get("verbose", 0) + (value or 0)
    level = max(logging.WARNING - 10 * obj["verbose"], logging.DEBUG)
    logging.basicConfig(level=level, format="%(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--config and -v, on the group and on every command, so either place works."""
    fn = click.option("-v", "--verbose", count=True, expose_value=False,
                      callback=_set_verbosity,
                      help="More log output (-vv for debug).")(fn)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False),
                        default=None, expose_value=False, callback=_set_config,
                        help="TOML config file (default $TRAFFICTHRESHOLD_CONFIG, else "
                             "/etc/trafficthreshold/config.toml if present).")(fn)


def segment_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--key and --backend, for every command that touches the segment."""
    @click.option("--key", type=KeyType(), default=None,
                  help="SysV IPC key (decimal or 0x hex). Default: $TRAFFICTHRESHOLD_KEY, "
                       "then key in the config, then 0x54546831.")
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
              envvar="TRAFFICTHRESHOLD_CONFIG", expose_value=False, callback=_set_config,
              help="TOML config file (default /etc/trafficthreshold/config.toml if present); "
                   "also accepted after the command.")
@click.option("-v", "--verbose", count=True, expose_value=False, callback=_set_verbosity,
              help="More log output (-vv for debug); also accepted after the command.")
@click.version_option(package_name="trafficthreshold")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Count page views across web workers; alert by mail on bursts.

    Example: trafficthreshold install && trafficthreshold run
    """
    ctx.ensure_object(dict)


# ----------------------------------------------------------------- segment

@main.command()
@common_options
@segment_options
@click.option("--keys", type=int, default=segment.Geometry.keys, show_default=True,
              callback=_geometry_check("keys"),
              help="Capacity of the key table ((account, event) pairs, the reserved "
                   "ones included).")
@click.option("--minutes", type=int, default=segment.Geometry.minutes, show_default=True,
              callback=_geometry_check("minutes"), help="Minutes of history kept in the ring.")
@click.option("--stripes", type=int, default=segment.Geometry.stripes, show_default=True,
              callback=_geometry_check("stripes"),
              help="Copies of each counter, so workers do not share a cache line.")
@click.option("--mode", type=OctalMode(), default="660", show_default=True,
              help="Permissions (octal) of the segment and semaphore; 660 lets the "
                   "--group in, a world-writable mode lets any local user change counts.")
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
    # The library's own warnings when it gives them (segment.install's
    # result.warnings); until then the one about a world-writable mode here.
    warnings = getattr(result, "warnings", None)
    if warnings is None:
        warnings = [f"mode {mode:03o} is world-writable: any local user can change the "
                    "counts and the throttle level; use 660 with --group"] if mode & 0o002 else []
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    verb = "installed" if result.created else "already installed"
    click.echo(f"{verb}: {cfg.backend} segment at key {cfg.key:#x}, {result.size:,} bytes, "
               f"{result.geometry.keys} keys, {result.geometry.minutes} minutes, "
               f"mode {mode:o}" + (f", group {group}" if group else ""))


@main.command()
@common_options
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
    rolled: list[int] = []
    rollup = None if no_rollup else functools.partial(_final_rollup, cfg, rolled)
    result = segment.uninstall(cfg.key, cfg.backend, force=force, rollup=rollup)
    if rolled:  # it runs twice: on the live segment, then on the retired one
        from .store import location
        click.echo(f"rolled {sum(rolled)} pending hits into {location(cfg)}")
    attached = int(result.get("attached", 0) or 0)
    click.echo(f"removed the {result['removed']} ({result['size']:,} bytes)"
               + (f"; {_plural(attached, 'process was', 'processes were')} still attached"
                  if attached else ""))


def _final_rollup(cfg: configuration.Config, rolled: list[int], counter: Any) -> None:
    from .rollup import Roller
    from .store import open_writer
    with open_writer(cfg) as store:
        rolled.append(Roller(counter, store).roll(time.time(), include_current=True))


@main.command()
@common_options
@segment_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@_fail_clearly
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the segment, its keys and counts (keys in use, and the slots the
    supervisor reclaimed from idle keys), and the throttle level; with
    [store] backend = "redis", the farm too: each host, its level and
    counts, the farm's total and the alerts' leader.

    Example: trafficthreshold status --json
    """
    from .errors import LayoutMismatch, SegmentNotFound
    from .status import collect, render, render_subscribers, subscribers
    cfg = _load(ctx)
    now = time.time()
    try:
        info = collect(cfg, now)
    except (LayoutMismatch, SegmentNotFound) as exc:
        # No segment (or another's at the key): the subscribers still run,
        # and this is when their events go uncounted; show them first.  (A
        # user refused the segment gets the one error: joining its group is
        # the fix for the state directory too.)
        subs = subscribers(cfg, now)
        if subs["subscribers"] or subs["subscriber_problems"]:
            click.echo(json.dumps({"segment": None, "error": _message(exc) or str(exc), **subs},
                                  indent=2) if as_json else
                       "\n".join(render_subscribers(subs["subscribers"],
                                                    subs["subscriber_problems"])))
        raise
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


@main.command()
@common_options
@segment_options
@click.argument("account", required=False)
@click.argument("event", required=False, default="pageview")
@click.option("-n", type=click.IntRange(1, MAX_HIT_N), default=1, show_default=True,
              help="How many hits.")
@click.option("--status", default=None,
              help="Count this funnel status of EVENT instead (an order's 'paid').")
@click.pass_context
@_fail_clearly
def hit(ctx: click.Context, account: str | None, event: str, n: int,
        status: str | None) -> None:
    """Count hits from the shell (and so from PHP, cron, any language).

    ACCOUNT "all" or omitted counts only the total.

    Example: trafficthreshold hit example.com pageview -n 3
    Example: trafficthreshold hit example.com order --status paid
    """
    cfg = _load(ctx)
    counter = segment.attach(cfg.key, cfg.backend)
    counter.hit(None if account in (None, "all") else account, event, n, status=status)



@main.command()
@common_options
@segment_options
@click.argument("addresses", metavar="ADDRESS...", nargs=-1, required=True)
@click.option("--topic", "topics", multiple=True,
              help="Subscribe to this topic (a prefix of the frame; repeatable). "
                   "Default: every message.")
@click.option("--type", "types", multiple=True,
              help="Also count events of this type, as hit(account, TYPE) (repeatable).")
@click.option("--hwm", type=click.IntRange(0), default=DEFAULT_HWM,
              show_default=True,
              help="Messages ZMQ queues for this subscriber before it drops (ZMQ_RCVHWM; "
                   "0: no limit).")
@click.option("--max-size", type=click.IntRange(64), show_default=True,
              default=DEFAULT_MAX_SIZE,
              help="The largest frame or line accepted, in bytes (ZMQ_MAXMSGSIZE).")
@click.option("--name", default=None,
              help="Names this subscriber in status, /metrics and the dashboard "
                   "(default: from the addresses, e.g. tcp-127.0.0.1-6000; stdin for -).")
@click.pass_context
@_fail_clearly
def subscribe(ctx: click.Context, addresses: tuple[str, ...], topics: tuple[str, ...],
              types: tuple[str, ...], hwm: int, max_size: int, name: str | None) -> None:
    """Count Bootic's pageview and order events from the ZMQ PUB socket at
    each ADDRESS (a SUB socket connects to each), or from JSON lines
    on standard input with ADDRESS "-".  Runs until stopped (SIGTERM), or
    the end of the input.

    Example: trafficthreshold subscribe tcp://127.0.0.1:6000 --topic pageview --topic order
    Example: tail -F events.jsonl | trafficthreshold subscribe -
    """
    from .subscribe import Subscriber
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    if "-" in addresses and len(addresses) > 1:
        raise click.UsageError("ADDRESS '-' (standard input) goes alone")
    if addresses != ("-",):
        _need_zmq()
    cfg = _load(ctx)
    sys.exit(Subscriber(addresses, key=cfg.key, backend=cfg.backend, database=cfg.database,
                        topics=topics, types=types, hwm=hwm, max_size=max_size, name=name,
                        env=_env(ctx), config=cfg).run())


def _need_zmq() -> None:
    try:
        import zmq  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "subscribing to a ZMQ bus needs pyzmq: pip install 'trafficthreshold[zmq]' "
            "(or read JSON lines from standard input: trafficthreshold subscribe -)") from None

# ------------------------------------------------------------------ daemon

#: Why the HTTP server cannot listen, by errno (the words api/server.py uses
#: for the same errors on main, where it raises them itself).
_LISTEN_ERRORS = {
    errno.EADDRINUSE: "the address is already in use (another trafficthreshold run, or "
                      "another program, listens there)",
    errno.EACCES: "ports below 1024 need privileges (root or CAP_NET_BIND_SERVICE)",
    errno.EADDRNOTAVAIL: "the address is not one of this machine's",
}


@main.command()
@common_options
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
    sup = Supervisor(cfg, config_path=ctx.obj.get("config_path"), http=not no_http,
                     env=_env(ctx))
    try:
        status = sup.run()
    except OSError as exc:
        if exc.errno not in _LISTEN_ERRORS:
            raise
        where = (cfg.source if not cfg.source.startswith("<") else
                 f"a config file ({configuration.DEFAULT_PATH}, or name one with --config)")
        raise click.ClickException(
            f"cannot serve the stats API on {cfg.http.listen}: {_LISTEN_ERRORS[exc.errno]}; "
            f"set [http] listen = \"127.0.0.1:<free port>\" in {where}, or start with "
            "`trafficthreshold run --no-http`") from exc
    sys.exit(status)


@main.group("config")
@common_options
def config_group() -> None:
    """Check or show the configuration."""


@config_group.command("check")
@common_options
@click.pass_context
@_fail_clearly
def config_check(ctx: click.Context) -> None:
    """Validate the config file; name each bad key, its value and the fix.

    Example: trafficthreshold --config /etc/trafficthreshold/config.toml config check
    """
    cfg = _load(ctx)
    for warning in configuration.warnings(cfg):
        click.echo(f"warning: {warning}", err=True)
    if cfg.store.backend == "redis":
        from .store import PING_TIMEOUT, ping
        found = ping(cfg)
        if not found["answered"]:
            raise click.ClickException(
                f"{cfg.source}: the configuration is valid but {found['where']} did not answer "
                f"within {PING_TIMEOUT:g} s ({found['error']}): start Redis or fix [store] "
                "url / sentinels / service / the password")
        click.echo(f"{found['where']}: answered")
    click.echo(f"{cfg.source}: OK")


@config_group.command("show")
@common_options
@click.pass_context
@_fail_clearly
def config_show(ctx: click.Context) -> None:
    """Print the effective configuration as TOML (secrets hidden).

    Example: trafficthreshold config show
    """
    click.echo(configuration.dump(_load(ctx)), nl=False)


@main.command("systemd-unit")
@common_options
@click.option("--subscriber", is_flag=True,
              help="The bus subscriber's template unit (trafficthreshold-subscribe@.service, "
                   "docs/subscribe.rst) instead of the daemon's.")
@click.pass_context
@_fail_clearly
def systemd_unit(ctx: click.Context, subscriber: bool) -> None:
    """Print the systemd unit with this installation's paths.

    Example: trafficthreshold systemd-unit > /etc/systemd/system/trafficthreshold.service
    Example: trafficthreshold systemd-unit --subscriber > /etc/systemd/system/trafficthreshold-subscribe@.service
    """
    from .systemd import SUBSCRIBER_UNIT_NAME, UNIT_NAME, render_unit, warnings
    path = os.path.abspath(ctx.obj.get("config_path") or configuration.DEFAULT_PATH)
    for warning in warnings(config_path=path):
        click.echo(f"warning: {warning}", err=True)
    unit = SUBSCRIBER_UNIT_NAME if subscriber else UNIT_NAME
    click.echo(render_unit(config_path=path, unit=unit), nl=False)


@main.command("c-paths")
@common_options
@click.option("--cflags", "what", flag_value="cflags", help="Print the compiler flags only.")
@click.option("--libs", "what", flag_value="libs", help="Print the linker flags only.")
@click.option("--json", "what", flag_value="json", help="Print every path as JSON.")
@click.pass_context
@_fail_clearly
def c_paths(ctx: click.Context, what: str | None) -> None:
    """Print where the C library (libtrafficthreshold.so) and its header are.

    The library is the C core of the Python and PHP extensions, for C
    programs and any language with a C FFI (docs/php.rst).

    Example: cc prog.c $(trafficthreshold c-paths --cflags) $(trafficthreshold c-paths --libs)
    """
    from .cpaths import paths
    try:
        found = paths()
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    if what == "json":
        import json
        click.echo(json.dumps(found, indent=2))
    elif what is not None:
        click.echo(found[what])
    else:
        for name in ("header", "library", "cflags", "libs"):
            click.echo(f"{name}: {found[name]}")


# ------------------------------------------------------------------- stats

@main.command()
@common_options
@click.argument("account")
@click.argument("event")
@click.argument("year", type=int)
@click.argument("month", type=int, required=False)
@click.argument("day", type=int, required=False)
@click.argument("hour", type=int, required=False)
@click.option("--json", "as_json", is_flag=True, help="The stats API's JSON.")
@click.option("--funnels", is_flag=True,
              help="The counts per status of EVENT (hit(..., status=...)) in a year or a "
                   "month, as /api/stats/funnels answers them.")
@click.pass_context
@_fail_clearly
def stats(ctx: click.Context, account: str, event: str, year: int, month: int | None,
          day: int | None, hour: int | None, as_json: bool, funnels: bool) -> None:
    """Counts of a period from the store: a year's months, a month's days,
    a day's hours or an hour's minutes (zero-filled); with --funnels, the
    counts per status of a year or a month.

    Example: trafficthreshold stats example.com pageview 2026 11
    Example: trafficthreshold stats --funnels example.com order 2026 11
    """
    from .store import open_reader
    if funnels and day is not None:
        raise click.UsageError("--funnels counts a year or a month: give ACCOUNT EVENT YEAR "
                               "[MONTH], no day or hour")
    cfg = _load(ctx)
    with open_reader(cfg) as store:  # [store]: the SQLite file or the farm's Redis
        if store.empty:  # a missing or empty file: says so, writes nothing
            raise click.ClickException(store.empty)
        if funnels:
            _echo_funnel(account, event, year, month, store.funnel(account, event, year, month),
                         as_json)
            return
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


def _echo_funnel(account: str, event: str, year: int, month: int | None,
                 result: dict[str, Any], as_json: bool) -> None:
    """``stats --funnels``: a status a line, by name, then the total."""
    if as_json:
        click.echo(json.dumps({"account": account, "event": event, "year": year,
                               "month": month, "data": result["data"],
                               "total": result["total"]}))
        return
    label = "-".join(f"{v:02d}" for v in (year, month) if v is not None)
    click.echo(f"{account} {event} {label} by status")
    width = max([len(status) for status in result["data"]] + [5])
    for status, n in result["data"].items():
        click.echo(f"{status:<{width}}  {n:>12,}")
    click.echo(f"{'total':<{width}}  {result['total']:>12,}")


# ------------------------------------------------------------------- store

@main.group("store")
@common_options
def store_group() -> None:
    """The period store: move this host's SQLite history into the farm's Redis."""


@store_group.command("migrate")
@common_options
@click.option("--to", "url", required=True,
              help="The farm's Redis, e.g. redis://10.0.0.5:6379/0 (no password in it: "
                   "[store] password_file or password_env is used).")
@click.option("--from", "source", type=click.Path(dir_okay=False), default=None,
              help="The SQLite file (default: database in the config).")
@click.pass_context
@_fail_clearly
def store_migrate(ctx: click.Context, url: str, source: str | None) -> None:
    """Copy this host's SQLite periods into Redis, exactly once (a rerun
    adds nothing).  Stop the daemon first; then set [store] backend = "redis".

    Example: trafficthreshold store migrate --to redis://10.0.0.5:6379/0
    """
    import urllib.parse
    from . import migrate, store as stores
    from .config import url_secrets
    from .store import redact_url
    if urllib.parse.urlsplit(url).password or url_secrets(url):
        raise click.ClickException(
            "--to holds a password (it would show in `ps` and the shell history): remove it "
            "and set [store] password_file or password_env in the config")
    cfg = _load(ctx)
    cfg = dataclasses.replace(cfg, store=dataclasses.replace(
        cfg.store, backend="redis", url=url, sentinels=()))
    path = source or cfg.database
    if not os.path.exists(path):
        raise click.ClickException(f"{path} does not exist: name the SQLite file with --from")
    ring = migrate.refuse_running_daemon(cfg, path)
    instance = migrate.source_instance(path)  # its watermarks carry over under it
    try:
        with stores.open_writer(cfg) as target:  # records or checks the farm's zone
            if ring:
                target.cover_ring(ring)
            with click.progressbar(length=migrate.count_hashes(path), label="hashes",
                                   file=sys.stderr) as bar:
                summary = migrate.migrate(path, target, instance=instance,
                                          progress=bar.update)
    except Exception as exc:
        if not stores.unreachable(exc):
            raise
        # The Redis of --to, not the config's store (_message would name that).
        raise click.ClickException(
            f"the Redis of --to, {redact_url(url)}, did not answer ({type(exc).__name__}: {exc}): check "
            "that it runs there and, if it needs one, the password ([store] password_file "
            "or password_env); then run the command again: the hashes already copied are "
            "not copied twice") from exc
    click.echo(f"migrated {path} into {stores.location(cfg)}: {summary.hashes} hashes "
               f"added to, {summary.skipped} with nothing new, {summary.hits:,} hits, "
               f"{summary.watermarks} watermarks"
               + (f", {summary.expired} minute hashes beyond retention.minutes left out"
                  if summary.expired else ""))


# ------------------------------------------------------------------- mail

@main.command("test-mail")
@common_options
@click.option("--rule", default=None, help="Render the mail of this [[alert]] rule.")
@click.option("--to", "to", multiple=True, help="Send here instead of the rule's recipients.")
@click.pass_context
@_fail_clearly
def test_mail(ctx: click.Context, rule: str | None, to: tuple[str, ...]) -> None:
    """Send a sample alert through the configured transport.

    Example: trafficthreshold test-mail --to ops@example.com
    """
    from .alerts.mail import send_test
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
@common_options
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
