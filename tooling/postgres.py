"""A throw-away PostgreSQL 15 server for the tests and the benchmarks (Debian's ``postgresql-15``).

:class:`PostgresServer` runs ``initdb`` in a temporary directory and ``pg_ctl start`` on a free
port of 127.0.0.1 (trust authentication, reachable only from this machine), then hands out
fresh databases (:meth:`PostgresServer.create_database`) so that tests do not see each other's
rows. PostgreSQL refuses to run as root: as root the server runs as the unprivileged user
``nobody`` through ``runuser`` (CI runs as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tooling.orthanc_harness import PLUGIN_DIRECTORY, free_port

BINARIES = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "postgres"
UNPRIVILEGED_USER = "nobody"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's binaries are missing or cannot start here (the message says why)."""


class PostgresServer:
    """One PostgreSQL server in its own data directory, stopped (and deleted) by :meth:`stop`.

    Args:
        directory: where the data directory and the log go (a temporary directory by default).
    """

    def __init__(self, directory: Path | None = None) -> None:
        if not (BINARIES / "initdb").exists():
            raise PostgresUnavailable(f"PostgreSQL 15 is not installed ({BINARIES}/initdb is missing): "
                                      "run `make install` (Debian package postgresql-15)")
        self._owned_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="abscess-pg-"))
        self.data = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self.port = free_port()
        self._databases = 0

    @property
    def _as_server_user(self) -> list[str]:
        return ["runuser", "-u", UNPRIVILEGED_USER, "--"] if os.geteuid() == 0 else []

    def start(self, timeout: float = 60.0) -> "PostgresServer":
        """initdb + pg_ctl start; returns when the server accepts connections.

        Raises:
            PostgresUnavailable: initdb or the server failed (the message carries its output).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # the unprivileged server user must own its files
            self.directory.chmod(0o755)
            shutil.chown(self.directory, UNPRIVILEGED_USER)
        initdb = subprocess.run([*self._as_server_user, str(BINARIES / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                                 "--auth=trust", "--encoding=UTF8", "--no-sync"],
                                capture_output=True, text=True, cwd=self.directory)
        if initdb.returncode != 0:
            raise PostgresUnavailable(f"initdb failed ({initdb.returncode}): {initdb.stderr[-2000:]}")
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory} -c fsync=off "
                   "-c max_connections=200 -c shared_buffers=128MB")
        started = subprocess.run([*self._as_server_user, str(BINARIES / "pg_ctl"), "-D", str(self.data), "-l",
                                  str(self.log_path), "-o", options, "-w", "-t", str(int(timeout)), "start"],
                                 capture_output=True, text=True, cwd=self.directory)
        if started.returncode != 0:
            raise PostgresUnavailable(f"PostgreSQL did not start ({started.returncode}): {started.stderr[-1000:]}\n"
                                      f"{self.log_tail()}")
        deadline = time.monotonic() + timeout
        while subprocess.run([str(BINARIES / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise PostgresUnavailable(f"PostgreSQL did not accept connections in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def url(self, database: str = "postgres") -> str:
        """``postgresql://`` URL of a database of this server."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        self._databases += 1
        name = name or f"test_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its directory when it made it."""
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self._as_server_user, str(BINARIES / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                            "-w", "stop"], capture_output=True, cwd=self.directory)
        if self._owned_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def orthanc_on_postgres(config: dict, server: PostgresServer, database: str) -> dict:
    """An Orthanc configuration changed to keep its index and its DICOM files in PostgreSQL.

    Debian's ``orthanc-postgresql`` 4.0 plugins, with ``"Lock": false`` so that several Orthanc
    processes share the database (one ingesting with our plugin, others reading).
    """
    plugins = [*config.get("Plugins", []), str(PLUGIN_DIRECTORY / "libOrthancPostgreSQLIndex.so"),
               str(PLUGIN_DIRECTORY / "libOrthancPostgreSQLStorage.so")]
    section = {"EnableIndex": True, "EnableStorage": True, "Host": "127.0.0.1", "Port": server.port,
               "Database": database, "Username": SUPERUSER, "Password": "", "Lock": False,
               "IndexConnectionsCount": 2, "MaximumConnectionRetries": 10, "ConnectionRetryInterval": 1}
    return {**config, "Plugins": plugins, "PostgreSQL": section}
