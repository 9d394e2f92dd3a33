"""trafficthreshold.store (the package's __init__): opening the configured
store, SQLite or a real redis-server; the interface both backends keep."""
from __future__ import annotations

import time

import pytest

from trafficthreshold import config as configuration, store as stores
from trafficthreshold.errors import ConfigError
from trafficthreshold.store.redis import RedisStore
from trafficthreshold.store import SQLiteStore

T0 = 1_800_000_000
M0 = T0 // 60


def make(tmp_path, store_table: str = "", timezone: str = "UTC"):
    text = (f'database = "{tmp_path / "s.sqlite3"}"\ntimezone = "{timezone}"\n'
            + (f"[store]\n{store_table}" if store_table else ""))
    return configuration.parse(text, env={})


def redis_table(srv, extra: str = "") -> str:
    return f'backend = "redis"\nurl = "redis://127.0.0.1:{srv.port}/0"\nhost = "web1"\n{extra}'


def test_sqlite_is_the_default(tmp_path):
    cfg = make(tmp_path)
    assert cfg.store.backend == "sqlite" and cfg.store.prefix == "track"
    with stores.open_reader(cfg) as reader:
        assert "does not exist yet" in reader.empty
    assert not (tmp_path / "s.sqlite3").exists()
    with stores.open_writer(cfg) as writer:
        assert isinstance(writer, SQLiteStore)
        writer.roll([("acme", "pageview", M0, 4)], T0)
    with stores.open_reader(cfg) as reader:
        assert reader.period("acme", "pageview", 2027)["total"] == 4
        assert reader.accounts() == ["acme"] and reader.events() == ["pageview"]


def test_the_redis_reader_has_the_store_read_methods(tmp_path, redis_server):
    cfg = make(tmp_path, redis_table(redis_server))
    with stores.open_writer(cfg) as writer:
        assert isinstance(writer, RedisStore)
        writer.roll([("acme", "pageview", M0, 4), ("all", "pageview", M0, 4),
                     ("acme", "signup", M0, 1), ("all", "signup", M0, 1)], T0)
    assert redis_server.client().hget("track~farm", "timezone") == b"UTC"
    with stores.open_reader(cfg) as reader:
        assert reader.empty is None
        assert reader.period("acme", "pageview", 2027, 1)["data"][15] == 4
        assert reader.accounts() == ["acme", "all"]
        assert reader.accounts("signup") == ["acme", "all"]
        assert reader.events() == ["pageview", "signup"]
    assert not (tmp_path / "s.sqlite3").exists()


def test_another_zone_is_refused_naming_both(tmp_path, redis_server):
    stores.open_writer(make(tmp_path, redis_table(redis_server))).close()
    with pytest.raises(ConfigError, match="Europe/Zurich.*UTC"):
        stores.open_writer(make(tmp_path, redis_table(redis_server), "Europe/Zurich"))


def test_the_password_comes_from_the_file_or_the_environment(tmp_path, redis_server):
    admin = redis_server.client()
    admin.config_set("requirepass", "s3cret")
    try:
        secret = tmp_path / "redis.pass"
        secret.write_text("s3cret\n")
        secret.chmod(0o600)
        with_file = make(tmp_path, redis_table(redis_server, f'password_file = "{secret}"'))
        assert stores.ping(with_file)["answered"]
        with_env = make(tmp_path, redis_table(redis_server, 'password_env = "TT_REDIS_PW"'))
        assert stores.ping(with_env, env={"TT_REDIS_PW": "s3cret"})["answered"]
        with pytest.raises(ConfigError, match="TT_REDIS_PW.*not set"):
            stores.open_reader(with_env, env={})
        none = stores.ping(make(tmp_path, redis_table(redis_server)))
        assert not none["answered"] and "Authentication" in none["error"]
        assert "s3cret" not in configuration.dump(with_file)
        missing = make(tmp_path, redis_table(redis_server,
                                             f'password_file = "{tmp_path}/nope"'))
        with pytest.raises(ConfigError, match="store.password_file"):
            stores.open_writer(missing)
    finally:
        import redis
        redis.Redis(port=redis_server.port, password="s3cret").config_set("requirepass", "")


def test_ping_of_a_redis_that_is_down_answers_false_quickly(tmp_path, redis_server):
    cfg = make(tmp_path, redis_table(redis_server))
    assert stores.ping(cfg)["answered"]
    redis_server.kill()
    started = time.monotonic()
    found = stores.ping(cfg)
    assert not found["answered"] and "ConnectionError" in found["error"]
    assert time.monotonic() - started < stores.PING_TIMEOUT + 0.5
    assert "redis://127.0.0.1" in found["where"] and "host web1" in found["where"]


def test_both_backends_keep_the_whole_interface() -> None:
    """Every method of base.PeriodStore exists on SQLiteStore and RedisStore
    and takes the interface's parameters by the same names (the roller, the
    API and the CLI call them without knowing which backend it is)."""
    import inspect

    from trafficthreshold.store.base import PeriodStore

    wanted = {name: inspect.signature(member) for name, member in vars(PeriodStore).items()
              if callable(member) and (not name.startswith("_") or name in ("__enter__",
                                                                           "__exit__"))}
    assert {"roll", "period", "accounts", "events", "years", "close"} <= set(wanted)
    for backend in (SQLiteStore, RedisStore):
        for name, signature in wanted.items():
            method = getattr(backend, name, None)
            assert callable(method), f"{backend.__name__} lacks {name}"
            have = inspect.signature(method).parameters
            for param in signature.parameters.values():
                if param.kind is param.VAR_POSITIONAL:
                    continue
                assert param.name in have, f"{backend.__name__}.{name} lacks {param.name}"


def test_the_host_claim_is_asked_of_the_store_not_of_its_backend(tmp_path, redis_server):
    """The supervisor never asks which backend it has: the store says
    whether it is shared (``shared``) and takes the farm's host name
    (``claim_host``).  One host's file has nothing to claim; the farm's
    Redis gives a claim that a second supervisor under the name cannot
    take, and that is free again once released."""
    from trafficthreshold.store.base import PeriodStore

    assert "shared" in PeriodStore.__annotations__
    with stores.open_writer(make(tmp_path)) as own:
        assert own.shared is False
        assert own.claim_host(7, pid=4100, wait=False) is None
    cfg = make(tmp_path, redis_table(redis_server))
    with stores.open_writer(cfg) as first, stores.open_writer(cfg) as second:
        assert first.shared is True
        claim = first.claim_host(7, pid=4100, wait=False)
        holder = type(claim).holder(redis_server.client(), "web1")
        assert holder["pid"] == 4100 and holder["instance"] == 7
        with pytest.raises(ConfigError, match="web1"):
            second.claim_host(8, pid=4200, wait=False)
        claim.release()
        again = second.claim_host(8, pid=4200, wait=False)
        assert type(again).holder(redis_server.client(), "web1")["pid"] == 4200
        again.release()


def test_file_problem_names_the_file_and_its_recovery_only_for_sqlite_errors():
    """cli.py words a sqlite3 error through store.file_problem (no sqlite3
    outside store/): the file and the recovery for a damaged file; None,
    without asking for the file, for any other error."""
    import sqlite3

    asked = []
    text = stores.file_problem(sqlite3.DatabaseError("database disk image is malformed"),
                               lambda: asked.append(1) or "/var/lib/tt/stats.sqlite3")
    assert "/var/lib/tt/stats.sqlite3" in text and ".recover" in text and asked == [1]
    assert stores.file_problem(OSError("no"), lambda: asked.append(2) or "x") is None
    assert asked == [1]


# ------------------------------------------------ the house rules of store/
#
# Read from the source (ast), since a rule of where code lives cannot be
# seen from the outside: no SQL and no backend test outside store/.

import ast  # noqa: E402
import pathlib  # noqa: E402

PACKAGE = pathlib.Path(stores.__file__).resolve().parent.parent
SQL_WORDS = ("SELECT ", "INSERT ", "UPDATE ", "DELETE ", "PRAGMA ", "CREATE ", "BEGIN", "DROP ")

#: Modules outside store/sqlite.py that may name sqlite3, and why.
SQLITE3_ELSEWHERE = {
    # classifies a sqlite3 error of the configured file (store.unavailable)
    "store/__init__.py": "errors",
    # the host rules' mail queue and alert state: tables of its own (alert_state,
    # alert_outbox), the MailQueue's SQLite implementation (docs/alerts.rst)
    "alerts/store.py": "sql",
    # the mail worker retries the host queue's store errors (sqlite3.Error)
    "alerts/mail.py": "errors",
    # the alert-state reader's type (alerts.store.open_reader): no SQL of its own
    "api/app.py": "errors",
}
#: The Redis clients read outside store/ on something but ``self``, and
#: why: the farm's live counts read with the store's client (issue 25
#: rewrites it); the supervisor hands its host claim to the farm link's own
#: client (FarmSync's, not a store's); HostClaim.on() copies a claim onto
#: another client (farm.py's own class).
BACKEND_ELSEWHERE = {"api/app.py": ["self._store().client"],
                     "supervisor.py": ["self.farm.client"],
                     "farm.py": ["other.client"]}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield str(path.relative_to(PACKAGE)), ast.parse(path.read_text(), str(path))


def _sql_calls(tree: ast.AST) -> list[int]:
    """Lines of ``.execute*(...)`` calls whose first argument is SQL text,
    or is not a literal (SQL handed over through a name counts too)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("execute", "executemany", "executescript") and node.args:
            first = node.args[0]
            text = "".join(part.value for part in ast.walk(first)
                           if isinstance(part, ast.Constant) and isinstance(part.value, str))
            # SQL through a name, a call, ...: its text cannot be read here
            literal = isinstance(first, (ast.Constant, ast.JoinedStr))
            if not literal or any(word in text.upper() for word in SQL_WORDS):
                lines.append(node.lineno)
    return lines


def test_no_sql_outside_store_sqlite():
    """Only store/sqlite.py runs SQL on the period store; the other
    modules naming sqlite3 are listed above with their reason, and only
    the alert queue's own store runs SQL (on its own tables)."""
    found = {}
    for name, tree in _modules():
        if name == "store/sqlite.py":
            continue
        imports = any(isinstance(n, (ast.Import, ast.ImportFrom)) and any(
            a.name.split(".")[0] == "sqlite3" for a in n.names) or
            isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "sqlite3"
            for n in ast.walk(tree))
        sql = _sql_calls(tree)
        if imports or sql:
            found[name] = "sql" if sql else "errors"
    assert found == SQLITE3_ELSEWHERE


def _backend_uses(tree: ast.AST) -> list[int]:
    """Lines that ask which backend a store is, or reach a Redis client
    that is not the class's own (``self.client``): an ``isinstance`` or
    ``issubclass`` of a backend class, a comparison naming one (``type(s)
    is RedisStore``, ``type(s).__name__ == "RedisStore"``), ``hasattr`` or
    ``getattr`` of ``"client"``, and ``X.client`` for any ``X`` but
    ``self`` (a store's variable need not be called "store")."""
    def names(node: ast.AST) -> set[str]:
        return {n.id if isinstance(n, ast.Name) else
                n.attr if isinstance(n, ast.Attribute) else
                n.value if isinstance(n, ast.Constant) and isinstance(n.value, str) else ""
                for n in ast.walk(node)}

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
            if node.func.id in ("isinstance", "issubclass") and len(node.args) == 2 \
                    and names(node.args[1]) & BACKENDS:
                found.append(node)
            if node.func.id in ("hasattr", "getattr") and len(node.args) >= 2 \
                    and isinstance(node.args[1], ast.Constant) and node.args[1].value == "client":
                found.append(node)
        if isinstance(node, ast.Compare) and names(node) & BACKENDS:
            found.append(node)
        if isinstance(node, ast.Attribute) and node.attr == "client" \
                and not (isinstance(node.value, ast.Name) and node.value.id == "self"):
            found.append(node)
    return sorted((node.lineno, ast.unparse(node)) for node in found)


#: The backend classes a module outside store/ must not ask about.
BACKENDS = {"RedisStore", "SQLiteStore"}


def test_no_backend_test_outside_store():
    """No module outside store/ asks which backend a store is or reaches
    through it to its Redis client: it calls the PeriodStore interface.
    The Redis clients read outside ``self`` are listed with their owner."""
    found = {name: [text for _, text in uses] for name, tree in _modules()
             if not name.startswith("store/") and (uses := _backend_uses(tree))}
    assert found == BACKEND_ELSEWHERE


def test_the_backend_check_sees_every_form(tmp_path):
    """The check above can fail: each way of asking for the backend, and a
    store's client under any variable name, is seen; the class's own
    client and the configured backend's name are not."""
    probe = ast.parse(
        "def f(s, target, cfg):\n"
        "    a = isinstance(s, stores.RedisStore)\n"        # 2
        "    b = type(s) is RedisStore\n"                    # 3
        "    c = type(s).__name__ == 'SQLiteStore'\n"        # 4
        "    d = hasattr(s, 'client')\n"                     # 5
        "    e = target.client\n"                            # 6
        "    g = self.store.client\n"                        # 7
        "    h = self.client\n"                              # 8
        "    i = cfg.store.backend == 'redis'\n")            # 9
    assert [line for line, _ in _backend_uses(probe)] == [2, 3, 4, 5, 6, 7]


def test_the_sql_check_sees_sql_through_a_variable():
    """The SQL check can fail: SQL text handed to execute() through a name
    (or anything but a literal) counts as SQL, as a literal does; a
    pipeline's execute() without arguments does not."""
    probe = ast.parse("sql = 'SELECT 1'\nconn.execute(sql)\nconn.execute('PRAGMA x')\n"
                      "pipe.execute()\nconn.execute(f'SELECT {t}')\n")
    assert _sql_calls(probe) == [2, 3, 5]
