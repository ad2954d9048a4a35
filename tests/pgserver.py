"""A real PostgreSQL (Debian package ``postgresql``) as a plain process for the tests:
``initdb`` and ``pg_ctl`` in a temporary directory, listening on a loopback port, as
the tests start Orthanc.

``initdb`` refuses to run as root; as root (CI, this machine) the server runs as the
``postgres`` user that the Debian package creates (``runuser``), otherwise as the
calling user.  Authentication is ``trust`` on loopback only.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from orthanc_ctl import free_port


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (scripts/bootstrap.sh installs it)")
    return Path(found[-1]).parent


class PostgresServer:
    """One PostgreSQL cluster in its own temporary directory."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="fracture-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                   "--auth=trust", "-E", "UTF8", "--locale=C", "--no-instructions"])
        self.start()

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {out.stdout}{out.stderr}")
        return out

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Start (or restart, on the same port and data) and wait until it answers."""
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
                "-c max_connections=50 -c shared_buffers=16MB")
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                   str(self.root / "server.log"), "-o", opts, "-w", "-t", "60", "start"])
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                       "stop"])

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def new_database(self) -> str:
        """A fresh, empty database of its own (one per test); returns its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


_shared: PostgresServer | None = None


def shared_server() -> PostgresServer:
    """The one server of this test process (started on first use, stopped at exit)."""
    global _shared
    if _shared is None:
        _shared = PostgresServer()
        atexit.register(_shared.destroy)
    return _shared
