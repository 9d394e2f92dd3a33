"""A real nginx in front of a real php-fpm pool, on a free loopback port,
for the PHP extension's tests (Debian's nginx and php8.2-fpm).

Everything lives in one temporary directory: the pool's and nginx's
configuration, their pid files, logs and sockets, and the PHP site.  The
pool is ``pm = static`` with ``workers`` children, so a test knows how many
processes count.  Both run in the foreground as children of the test and
are stopped (SIGTERM, then SIGKILL) by ``stop()``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def php_fpm_binary() -> str | None:
    for name in ("php-fpm8.2", "php-fpm"):
        found = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
        if found:
            return found
    return None


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


FPM_CONF = """\
[global]
pid = {dir}/fpm.pid
error_log = {dir}/fpm.log
daemonize = no
log_level = notice

[site]
listen = {dir}/fpm.sock
listen.mode = 0666
pm = static
pm.max_children = {workers}
catch_workers_output = yes
decorate_workers_output = no
clear_env = no
"""

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        server_name _;
        root {root};
        index index.php;
        location / {{ try_files $uri /index.php?$query_string; }}
        location ~ \\.php$ {{
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
            fastcgi_pass unix:{dir}/fpm.sock;
        }}
    }}
}}
"""


class PhpSite:
    """nginx + php-fpm serving ``root`` on 127.0.0.1:``port``.

    ``ini`` are php.ini settings given to the pool with ``-d`` (for
    example ``{"extension": "/path/trafficthreshold.so",
    "trafficthreshold.key": "0x1234"}``); the pool reads no other ini file
    but Debian's module list (``PHP_INI_SCAN_DIR`` is the pool's own).
    """

    def __init__(self, workdir: Path, root: Path, ini: dict[str, str] | None = None,
                 workers: int = 4, env: dict[str, str] | None = None,
                 wrapper: list[str] | None = None) -> None:
        self.dir, self.root, self.ini, self.workers = workdir, root, dict(ini or {}), workers
        self.env = env or {}
        #: A command php-fpm runs under (benchmarks: valgrind --tool=callgrind).
        self.wrapper = list(wrapper or [])
        self.port = free_port()
        self.fpm: subprocess.Popen | None = None
        self.nginx: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "PhpSite":
        fpm, nginx = php_fpm_binary(), nginx_binary()
        if fpm is None or nginx is None:
            pytest.skip("nginx and php8.2-fpm are not installed (apt-get install nginx php8.2-fpm)")
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        (self.dir / "fpm.conf").write_text(FPM_CONF.format(dir=self.dir, workers=self.workers))
        (self.dir / "nginx.conf").write_text(
            NGINX_CONF.format(dir=self.dir, port=self.port, root=self.root))
        args = [*self.wrapper, fpm, "-F", "-R", "-n", "-y", str(self.dir / "fpm.conf")]
        for name, value in self.ini.items():
            args += ["-d", f"{name}={value}"]
        env = dict(os.environ, **self.env)
        self.fpm = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                    stderr=open(self.dir / "fpm.stderr", "wb"))
        self._wait(lambda: (self.dir / "fpm.sock").exists(), "php-fpm", self.dir / "fpm.log")
        self.nginx = subprocess.Popen([nginx, "-c", str(self.dir / "nginx.conf"),
                                       "-p", str(self.dir)],
                                      stdout=subprocess.DEVNULL,
                                      stderr=open(self.dir / "nginx.stderr", "wb"))
        self._wait(self._answers, "nginx", self.dir / "nginx-error.log")
        return self

    def _procs(self) -> tuple:
        return (self.fpm, self.nginx)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def _wait(self, ready, what: str, log: Path) -> None:
        patience = 120 if self.wrapper else 15
        deadline = time.monotonic() + patience
        while not ready():
            for proc in self._procs():
                if proc is not None and proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{what} exited at start: {self.log_text(log)}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{what} did not start in {patience} s: "
                                   f"{self.log_text(log)}")
            time.sleep(0.02)

    @staticmethod
    def log_text(path: Path) -> str:
        try:
            return path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def worker_pids(self) -> list[int]:
        """The pool's worker processes (children of the fpm master)."""
        assert self.fpm is not None
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.fpm.pid)],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def get(self, path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self) -> None:
        for proc in (self.nginx, self.fpm):
            if proc is None or proc.poll() is not None:
                continue
            # Under a wrapper (callgrind), php-fpm's graceful stop (SIGQUIT):
            # its workers exit normally, so the tool writes their profile.
            proc.send_signal(signal.SIGQUIT if self.wrapper and proc is self.fpm
                             else signal.SIGTERM)
            try:
                proc.wait(60 if self.wrapper else 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


REPO = Path(__file__).resolve().parent.parent


def build_extension(workdir: Path) -> Path:
    """Builds php/ the PHP way (phpize, configure, make) in a scratch copy
    of php/ next to the package's C core (the layout config.m4 expects:
    php/ and trafficthreshold/core/ side by side), so that the checkout
    stays clean.  Returns the build directory (modules/trafficthreshold.so
    in it); a failed step raises with its output."""
    if shutil.which("phpize") is None:
        pytest.skip("phpize is not installed (apt-get install php8.2-dev)")
    build = workdir / "php"
    sources = ["config.m4", "Makefile.frag", "trafficthreshold.c", "php_trafficthreshold.h",
               "trafficthreshold.ini"]
    (build / "tests").mkdir(parents=True)
    for name in sources:
        shutil.copy(REPO / "php" / name, build / name)
    for phpt in (REPO / "php" / "tests").glob("*.phpt"):
        shutil.copy(phpt, build / "tests" / phpt.name)
    shutil.copytree(REPO / "trafficthreshold" / "core", workdir / "trafficthreshold" / "core")
    (workdir / "tests" / "data").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "data" / "pageview_cases.json", workdir / "tests" / "data")
    for step in (["phpize"], ["./configure"], ["make", "-j2"]):
        done = subprocess.run(step, cwd=build, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(step)} failed in {build}:\n{done.stdout[-3000:]}"
                               f"\n{done.stderr[-3000:]}")
    return build


def apache_binary() -> str | None:
    return shutil.which("apache2") or ("/usr/sbin/apache2" if os.path.exists("/usr/sbin/apache2")
                                       else None)


APACHE_MODULES = "/usr/lib/apache2/modules"

APACHE_CONF = """\
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {dir}/apache2.pid
DefaultRuntimeDir {dir}/run
Mutex file:{dir}/run default
ErrorLog {dir}/error.log
LogLevel warn
User {user}
Group {user}
LoadModule mpm_prefork_module {modules}/mod_mpm_prefork.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule dir_module {modules}/mod_dir.so
LoadModule php_module {modules}/libphp8.2.so
StartServers {workers}
MinSpareServers {workers}
MaxSpareServers {workers}
MaxRequestWorkers {workers}
ServerLimit {workers}
MaxConnectionsPerChild 0
KeepAlive On
MaxKeepAliveRequests 0
PHPIniDir {dir}
DocumentRoot {root}
<Directory {root}>
    Require all granted
    AllowOverride None
    DirectoryIndex index.php
    FallbackResource /index.php
</Directory>
<FilesMatch "\\.php$">
    SetHandler application/x-httpd-php
</FilesMatch>
{admin}
{extra}
"""


class ApacheSite(PhpSite):
    """A real Apache (Debian's apache2, mpm_prefork, ``workers`` children
    started at once and kept) with Debian's mod_php (libapache2-mod-php8.2)
    serving a copy of ``root`` on 127.0.0.1:``port``, in the foreground
    (``-DFOREGROUND``) as a child of the test.

    ``ini`` goes into the server's own php.ini (``PHPIniDir``; Debian's
    conf.d is not scanned): ``extension`` must be there, since mod_php
    loads extensions when Apache starts.  ``admin`` are settings given as
    ``php_admin_value`` in the server's configuration (applied at each
    request's start, the way a site's Apache configuration sets them);
    ``extra`` more configuration (virtual hosts).
    The children run as ``user`` (Apache will not serve as root), so the
    site is copied to a world-readable directory and the segment must be
    installed for that user's group (``--group www-data``).
    """

    def __init__(self, workdir: Path, root: Path, ini: dict[str, str] | None = None,
                 admin: dict[str, str] | None = None, workers: int = 4,
                 user: str = "www-data", extra: str = "") -> None:
        super().__init__(workdir, root, ini, workers)
        self.admin, self.user = dict(admin or {}), user
        #: More configuration (``{port}`` and ``{root}`` filled in): virtual hosts.
        self.extra = extra
        self.apache: subprocess.Popen | None = None
        self.docroot: str | None = None

    def start(self) -> "ApacheSite":
        apache = apache_binary()
        if apache is None or not os.path.exists(f"{APACHE_MODULES}/libphp8.2.so"):
            pytest.skip("apache2 and mod_php are not installed "
                        "(apt-get install apache2 libapache2-mod-php8.2)")
        (self.dir / "run").mkdir(parents=True, exist_ok=True)
        self.docroot = tempfile.mkdtemp(prefix="tt-apache-www-")
        os.chmod(self.docroot, 0o755)
        for item in self.root.iterdir():
            shutil.copy(item, self.docroot)
            os.chmod(os.path.join(self.docroot, item.name), 0o644)
        (self.dir / "php.ini").write_text(
            "".join(f"{name} = \"{value}\"\n" for name, value in self.ini.items()))
        admin = "\n".join(f"php_admin_value {name} \"{value}\""
                          for name, value in self.admin.items())
        (self.dir / "apache2.conf").write_text(APACHE_CONF.format(
            dir=self.dir, port=self.port, root=self.docroot, user=self.user,
            modules=APACHE_MODULES, workers=self.workers, admin=admin,
            extra=self.extra.replace("{port}", str(self.port)).replace("{root}", self.docroot)))
        # Debian's conf.d (opcache, apcu, ...) is not this server's: an
        # empty PHP_INI_SCAN_DIR scans nothing.
        env = dict(os.environ, PHP_INI_SCAN_DIR="")
        self.apache = subprocess.Popen([apache, "-DFOREGROUND", "-f",
                                        str(self.dir / "apache2.conf")],
                                       env=env, start_new_session=True,
                                       stdout=subprocess.DEVNULL,
                                       stderr=open(self.dir / "apache2.stderr", "wb"))
        self._wait(self._ready, "apache2", self.dir / "error.log")
        return self

    def _ready(self) -> bool:
        return self._answers() and len(self.worker_pids()) >= self.workers

    def _procs(self) -> tuple:
        return (self.apache,)

    def worker_pids(self) -> list[int]:
        """Apache's children (the prefork processes that run PHP)."""
        assert self.apache is not None
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.apache.pid)],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def log(self) -> str:
        return self.log_text(self.dir / "error.log") + self.log_text(self.dir / "apache2.stderr")

    def stop(self) -> None:
        proc = self.apache
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # apache2's fast stop
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None:
            # Children that outlive their parent (a SIGKILLed one): the
            # server was started in a process group of its own.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.docroot is not None:
            shutil.rmtree(self.docroot, ignore_errors=True)
            self.docroot = None
