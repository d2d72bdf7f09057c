# Throwaway Postgres clusters for integration tests and benchmarks.
#
# Owns: finding the server binaries, initdb with SCRAM-SHA-256, starting and
# stopping a cluster on a free loopback port, pg_hba.conf, and small helpers
# that run SQL through the real psql binary. Knows nothing about the gateway.
#
# When running as root, every server process (initdb, pg_ctl, postgres) runs
# as the OS user `postgres`, because the server refuses to run as root; the
# temp dir that holds the data dir and the unix socket is owned by that user.
from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

from tests.support.net import free_port

SUPERUSER = "postgres"
DEFAULT_PASSWORD = "postgres-pw"
RUN_AS = "postgres"  # the OS user the server runs as when we are root

# First match wins in pg_hba.conf. `local ... trust` stays first so that the
# psql helper always gets in, whatever a test does to the TCP lines.
LOCAL_HBA = ["local all all trust"]
DEFAULT_HOST_HBA = [
    "host all all 127.0.0.1/32 scram-sha-256",
    "host all all ::1/128 scram-sha-256",
    "host replication all 127.0.0.1/32 scram-sha-256",
]

DEFAULT_SETTINGS: dict[str, object] = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": 200,
    "log_min_messages": "warning",
    "password_encryption": "scram-sha-256",
}


class PgClusterError(RuntimeError):
    """A cluster could not be created, started or queried."""


def find_bindir() -> Path:
    """The directory of the highest-versioned Postgres server binaries.

    :raises PgClusterError: if no directory holds ``initdb`` and ``pg_ctl``.
    """
    candidates: list[Path] = []
    for path in glob.glob("/usr/lib/postgresql/*/bin"):
        candidates.append(Path(path))
    candidates.sort(key=lambda p: _version_key(p.parent.name), reverse=True)
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()
        # pg_config may belong to an older client package: it only breaks ties.
        candidates.append(Path(out))
    except (OSError, subprocess.CalledProcessError):
        pass
    for d in candidates:
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    raise PgClusterError("no Postgres server binaries (initdb, pg_ctl) found")


def server_ids() -> tuple[int, int] | None:
    """(uid, gid) that server processes must switch to, or None when not root."""
    if os.geteuid() != 0:
        return None
    pw = pwd.getpwnam(RUN_AS)
    return pw.pw_uid, pw.pw_gid


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name)) or (0,)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _render(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return quote_literal(str(value))


class PgCluster:
    """One throwaway cluster: ``PgCluster().start()``, then ``close()``.

    :param name: a label used in the temp dir name and in errors.
    :param password: the password of the superuser ``postgres``.
    :param settings: postgresql.conf settings added to (or overriding) the defaults.
    :param keep: leave the temp dir behind on ``close()`` (for post-mortems).
    """

    def __init__(
        self,
        name: str = "pg",
        *,
        password: str = DEFAULT_PASSWORD,
        max_connections: int = 200,
        settings: Mapping[str, object] | None = None,
        keep: bool = False,
        start_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.password = password
        self.host = "127.0.0.1"
        self.port = 0
        self.keep = keep
        self.start_timeout = start_timeout
        self.settings: dict[str, object] = dict(DEFAULT_SETTINGS)
        self.settings["max_connections"] = max_connections
        self.settings.update(settings or {})
        self.bindir = find_bindir()
        self.base = Path(tempfile.mkdtemp(prefix=f"mirrorgate-{name}-"))
        self.datadir = self.base / "data"
        self.sockdir = self.base
        self.logfile = self.base / "server.log"
        self._running = False
        self._initialised = False
        self._hba_lines: list[str] = []

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<PgCluster {self.name} {state} {self.host}:{self.port} dir={self.base}>"

    # -- life cycle ---------------------------------------------------------

    def start(self) -> PgCluster:
        """initdb (first time only), write config, start, and wait until ready.

        :raises PgClusterError: with the server log tail if it does not come up.
        """
        if not self._initialised:
            self._initdb()
        last_error: PgClusterError | None = None
        for _attempt in range(3):  # a free port can be taken before we bind it
            self.port = free_port(self.host)
            self._write_conf()
            try:
                self._pg_ctl_start()
                self._wait_ready()
                self._running = True
                return self
            except PgClusterError as exc:
                last_error = exc
                self._pg_ctl("stop", "-m", "immediate", check=False)
                if "could not bind" not in self.log_tail() and "in use" not in str(exc):
                    break
        assert last_error is not None
        raise last_error

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``); the data dir stays."""
        if not self._running:
            return
        result = self._pg_ctl("stop", "-m", "fast", "-w", "-t", "30", check=False)
        if result.returncode != 0:
            self._pg_ctl("stop", "-m", "immediate", "-w", check=False)
        self._running = False

    def close(self) -> None:
        """Stop the server and delete the temp dir (unless ``keep``)."""
        self.stop()
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._running

    # -- connection strings -------------------------------------------------

    def dsn(
        self,
        user: str = SUPERUSER,
        password: str | None = None,
        dbname: str = "postgres",
        **params: str,
    ) -> str:
        """A libpq URL to this cluster over TCP.

        :param password: defaults to the superuser's password when ``user`` is
            the superuser; pass ``""`` for none.
        """
        if password is None:
            password = self.password if user == SUPERUSER else ""
        auth = quote(user, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        url = f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"
        if params:
            url += "?" + "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
        return url

    # -- SQL through psql ---------------------------------------------------

    def psql(self, sql: str, dbname: str = "postgres", *, timeout: float = 60.0) -> str:
        """Run ``sql`` with the real psql binary over the unix socket as ``postgres``.

        The script goes through standard input, so it may hold several
        statements (each its own transaction) and psql meta-commands.

        :returns: psql's standard output (unaligned, tuples only).
        :raises PgClusterError: with psql's standard error if it fails.
        """
        cmd = [
            str(self.bindir / "psql"),
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.sockdir),
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-d",
            dbname,
            "-f",
            "-",
        ]
        env = self._env()
        result = subprocess.run(
            cmd, input=sql, capture_output=True, text=True, env=env, timeout=timeout
        )
        if result.returncode != 0:
            raise PgClusterError(
                f"psql failed on {self.name} (db {dbname}, exit {result.returncode}):\n"
                f"{result.stderr.strip()}\n-- sql --\n{sql}"
            )
        return result.stdout

    def execute(self, sql: str, dbname: str = "postgres") -> None:
        """Run ``sql`` through psql and discard its output."""
        self.psql(sql, dbname)

    def query_value(self, sql: str, dbname: str = "postgres") -> str:
        """The output of a one-value query, stripped."""
        return self.psql(sql, dbname).strip()

    def create_database(self, name: str, owner: str | None = None) -> None:
        sql = f"CREATE DATABASE {quote_ident(name)}"
        if owner:
            sql += f" OWNER {quote_ident(owner)}"
        self.execute(sql + ";")

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending its sessions (``WITH (FORCE)``)."""
        self.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE);")

    def create_user(
        self,
        name: str,
        password: str | None,
        method: str = "scram-sha-256",
        *,
        superuser: bool = False,
    ) -> None:
        """Create a login role whose password is stored for ``method``.

        ``md5`` auth needs an MD5-hashed password, so that statement runs with
        ``password_encryption = md5``; anything else stores a SCRAM verifier
        (which the ``password`` method also accepts). The role gets CREATE on
        the public schema of no database: grant what a test needs.
        """
        encryption = "md5" if method == "md5" else "scram-sha-256"
        role = f"CREATE ROLE {quote_ident(name)} LOGIN"
        role += " SUPERUSER" if superuser else ""
        if password is not None:
            role += f" PASSWORD {quote_literal(password)}"
        self.execute(f"SET password_encryption = {quote_literal(encryption)};\n{role};\n")

    # -- pg_hba.conf ----------------------------------------------------------

    def set_hba(self, lines: Iterable[str], *, keep_defaults: bool = True) -> None:
        """Replace pg_hba.conf and reload, waiting until new sessions see it.

        The file is ``local all all trust``, then ``lines``, then (with
        ``keep_defaults``) the default SCRAM host lines. First match wins, so
        ``["host all alice 127.0.0.1/32 md5"]`` switches alice alone to MD5.
        """
        self._hba_lines = list(lines)
        self._write_hba(keep_defaults=keep_defaults)
        self.reload()

    def reset_hba(self) -> None:
        self.set_hba([])

    def reload(self) -> None:
        """Reload the configuration and wait until a new backend has it.

        ``pg_reload_conf()`` only signals the postmaster; the new
        ``pg_conf_load_time()`` shows in backends forked after it re-read the
        files, so poll that from fresh sessions.
        """
        before = self.query_value("SELECT pg_conf_load_time()")
        self.execute("SELECT pg_reload_conf();")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.query_value("SELECT pg_conf_load_time()") != before:
                return
            time.sleep(0.02)
        raise PgClusterError(f"{self.name}: reload not seen within 10s\n{self.log_tail()}")

    # -- logs ----------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- internals -------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in [k for k in env if k.startswith("PG")]:
            del env[key]  # a stray PGHOST/PGPORT/PGDATABASE must not redirect us
        env["HOME"] = str(self.base)
        env["LC_ALL"] = "C"
        return env

    def _run_server_tool(
        self, args: Sequence[str], *, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        ids = server_ids()
        result = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            env=self._env(),
            cwd=self.base,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            user=ids[0] if ids else None,
            group=ids[1] if ids else None,
            extra_groups=[] if ids else None,
        )
        if check and result.returncode != 0:
            raise PgClusterError(
                f"{Path(args[0]).name} failed on {self.name} (exit {result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}\n-- server log --\n{self.log_tail()}"
            )
        return result

    def _chown(self, path: Path) -> None:
        ids = server_ids()
        if ids:
            os.chown(path, *ids)

    def _initdb(self) -> None:
        # mkdtemp makes a 0700 dir: hand it to the server's user.
        self._chown(self.base)
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        os.chmod(pwfile, 0o600)
        self._run_server_tool(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                SUPERUSER,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]
        )
        pwfile.unlink()
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\ninclude_if_exists = 'mirrorgate.conf'\n")
        self._write_hba(keep_defaults=True)
        self._initialised = True

    def _write_conf(self) -> None:
        settings = dict(self.settings)
        settings["port"] = self.port
        settings["unix_socket_directories"] = str(self.sockdir)
        text = "".join(f"{k} = {_render(v)}\n" for k, v in settings.items())
        path = self.datadir / "mirrorgate.conf"
        path.write_text(text)
        self._chown(path)

    def _write_hba(self, *, keep_defaults: bool) -> None:
        lines = LOCAL_HBA + self._hba_lines + (DEFAULT_HOST_HBA if keep_defaults else [])
        path = self.datadir / "pg_hba.conf"
        path.write_text("\n".join(lines) + "\n")
        self._chown(path)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run_server_tool(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args], check=check
        )

    def _pg_ctl_start(self) -> None:
        timeout = str(int(self.start_timeout))
        result = self._pg_ctl("start", "-w", "-t", timeout, "-l", str(self.logfile), check=False)
        if result.returncode != 0:
            raise PgClusterError(
                f"{self.name}: pg_ctl start failed on port {self.port}:\n"
                f"{result.stdout}{result.stderr}\n-- server log --\n{self.log_tail()}"
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            result = subprocess.run(
                [
                    str(self.bindir / "pg_isready"),
                    "-h",
                    self.host,
                    "-p",
                    str(self.port),
                    "-U",
                    SUPERUSER,
                    "-t",
                    "2",
                ],
                capture_output=True,
                text=True,
                env=self._env(),
            )
            if result.returncode == 0:
                return
            last = result.stdout + result.stderr
            time.sleep(0.05)
        raise PgClusterError(
            f"{self.name}: not ready on {self.host}:{self.port} within "
            f"{self.start_timeout}s ({last.strip()})\n-- server log --\n{self.log_tail()}"
        )
