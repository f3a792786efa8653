from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

# before anything imports torch: torch and the spdy kernels then share one OpenMP runtime
# for the whole session, as in the CLI (two runtimes' idle workers contend on 2 cores and
# make end-to-end timings in the slow tests 10-15% off the profile)
import spdy.kernels  # noqa: F401
import pytest

from spdy.errors import StorageError
from spdy.testing.postgres import PostgresServer

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "spdy-timings"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"SPDY reference timings not found at {REFERENCE} (../shared beside the checkout)")
    return REFERENCE


def unavailable(reason: str) -> None:
    """Skip a test that needs what this machine lacks - but fail it in CI (``CI`` set), where it must run."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set: this test must run here)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on a loopback port for the session (:mod:`spdy.testing.postgres`)."""
    if importlib.util.find_spec("psycopg") is None:
        unavailable("the PostgreSQL driver psycopg is not installed: pip install -e '.[postgres]'")
    try:
        server = PostgresServer.start()
    except StorageError as exc:
        unavailable(f"no PostgreSQL server for the storage tests: {exc}")
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A new, empty database on the session's PostgreSQL server: its plain ``postgresql://`` URL."""
    return postgres_server.create_database(f"t{next(_DATABASES)}")


_DATABASES = itertools.count()
#: the storages workers can share, each tested alike
STORAGES = ("journal", "sqlite", "postgresql")


@pytest.fixture(params=STORAGES)
def shared_storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The ``--storage`` of a new, empty shared search: a journal file, an SQLite file or a PostgreSQL database."""
    if request.param == "journal":
        return str(tmp_path / "search.journal")
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'search.db'}"
    return request.getfixturevalue("postgres_url")
