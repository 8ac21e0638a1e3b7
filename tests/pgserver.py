"""A throwaway PostgreSQL server from Debian's binaries: initdb in a temp dir, its own loopback port.

Runs as the `postgres` user (the server refuses root); never touches the Debian cluster."""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from apiclient import free_port


def postgres_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/N/bin with initdb, or None when PostgreSQL is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """`with PostgresServer() as server:` a running server; `server.new_database()` gives a fresh URL."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.bindir = postgres_bindir()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL is not installed: run scripts/setup.sh (it installs Debian's postgresql)")
        self.settings = settings or {}
        self.dir = Path(tempfile.mkdtemp(prefix="ew-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = 0
        self._user = pwd.getpwnam("postgres")

    def _as_postgres(self, *argv: str) -> None:
        result = subprocess.run(argv, user=self._user.pw_uid, group=self._user.pw_gid, cwd=self.dir,
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}{log}")

    def start(self) -> "PostgresServer":
        os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        self._as_postgres(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                          "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions")
        for attempt in range(5):
            self.port = free_port()
            try:
                return self.resume()
            except RuntimeError:
                if attempt == 4:
                    raise
        return self

    def resume(self) -> "PostgresServer":
        """Starts the server (again, after pause()) on its port."""
        options = [f"-p {self.port}", f"-k {self.dir}", "-c listen_addresses=127.0.0.1",
                   *(f"-c {key}={value}" for key, value in self.settings.items())]
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                          "-o", " ".join(options), "-w", "-t", "60", "start")
        return self

    def pause(self) -> None:
        """Stops the server, keeping its data: what clients see when the database goes down."""
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        name = f"ew_{secrets.token_hex(4)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                           user=self._user.pw_uid, group=self._user.pw_gid, cwd=self.dir,
                           capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *_) -> None:
        self.stop()
