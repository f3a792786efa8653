"""A throw-away PostgreSQL server for tests and benchmarks of the shared search.

:class:`PostgresServer` runs ``initdb`` in a temporary folder and ``pg_ctl start`` on a
free loopback port (trust authentication, no fsync: a server for tests, not for data),
and removes both on :meth:`~PostgresServer.stop`. The programs come from ``PATH`` or
Debian's ``/usr/lib/postgresql/<version>/bin`` (package ``postgresql``). PostgreSQL
refuses to run as root, so as root the server runs as the ``postgres`` user that
Debian's package creates.

    with PostgresServer.start() as server:
        url = server.create_database("s1")   # postgresql://postgres@127.0.0.1:PORT/s1
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from spdy.errors import StorageError

#: settings for a server whose data may be lost: no waiting for the disk
FAST = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
SUPERUSER = "postgres"


def find_bindir() -> Path | None:
    """The folder of ``initdb``, ``pg_ctl`` and ``createdb``: that of ``initdb`` on PATH (links
    followed), else the newest of Debian's."""
    on_path = shutil.which("initdb")
    if on_path and (Path(on_path).resolve().parent / "createdb").exists():
        return Path(on_path).resolve().parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                    key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.parent.name)] or [0])
    return debian[-1].parent if debian else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A PostgreSQL server on ``127.0.0.1:port`` with its data in ``root`` (see the module docstring)."""

    def __init__(self, bindir: Path, root: Path, port: int, run_as: list[str]) -> None:
        self.bindir, self.root, self.port, self.run_as = bindir, root, port, run_as

    @classmethod
    def start(cls, tries: int = 3) -> "PostgresServer":
        """Start a server; :class:`~spdy.errors.StorageError` says why one cannot start here."""
        bindir = find_bindir()
        if bindir is None:
            raise StorageError("no PostgreSQL server programs (initdb, pg_ctl) on PATH or in /usr/lib/postgresql; "
                               "install Debian's package postgresql")
        root = Path(tempfile.mkdtemp(prefix="spdy-pg-"))
        run_as: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(SUPERUSER)
            except KeyError:
                shutil.rmtree(root, ignore_errors=True)
                raise StorageError("PostgreSQL does not run as root and there is no user 'postgres' to run it as") from None
            os.chown(root, pw.pw_uid, pw.pw_gid)
            run_as = ["runuser", "-u", SUPERUSER, "--"]
        try:
            _run(run_as + [str(bindir / "initdb"), "-D", str(root / "data"), "-U", SUPERUSER, "--auth=trust",
                          "--encoding=UTF8", "--no-sync"], cwd=root)
            for attempt in range(tries):
                server = cls(bindir, root, free_port(), run_as)
                try:
                    server._pg_ctl("start", "-w", "-t", "60", "-l", str(root / "server.log"), "-o",
                                   f"-h 127.0.0.1 -p {server.port} -k {root} " + " ".join(f"-c {c}" for c in FAST))
                    return server
                except StorageError:
                    if attempt + 1 == tries:
                        raise
            raise AssertionError("unreachable")
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise

    def url(self, database: str = SUPERUSER) -> str:
        """The URL a user would type for ``database`` on this server (plain ``postgresql://``)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database ``name``; its URL."""
        _run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name],
             cwd=self.root)
        return self.url(name)

    def stop(self) -> None:
        """Stop the server at once and remove its folder."""
        try:
            self._pg_ctl("stop", "-m", "immediate", "-w")
        except StorageError:
            pass
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _pg_ctl(self, *args: str) -> None:
        _run(self.run_as + [str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), *args], cwd=self.root)

    def __enter__(self) -> "PostgresServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _run(cmd: list[str], cwd: Path) -> None:
    name = Path(cmd[4] if cmd[0] == "runuser" else cmd[0]).name
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StorageError(f"{name}: {exc}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise StorageError(f"{name} failed (exit {done.returncode}): {' | '.join(tail)}")
