# Shared fixtures: throwaway Postgres clusters and per-test databases.
#
# Owns: the session-scoped clusters (started on first use, stopped at the end
# of the run) and `fresh_db`, which isolates each test in its own database on
# every cluster it uses. Unit tests never touch these fixtures, so a run of
# tests/unit starts no server.
from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.support.net import free_port as _free_port
from tests.support.pgcluster import PgCluster, PgClusterError, find_bindir


def _cluster(name: str) -> Iterator[PgCluster]:
    try:
        find_bindir()
    except PgClusterError as exc:
        pytest.skip(str(exc))
    cluster = PgCluster(name).start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def pg_primary() -> Iterator[PgCluster]:
    """The primary cluster: superuser ``postgres``/``pg_primary.password``."""
    yield from _cluster("primary")


@pytest.fixture(scope="session")
def pg_mirror() -> Iterator[PgCluster]:
    """A second cluster, the usual mirror; same superuser password."""
    yield from _cluster("mirror")


@pytest.fixture(scope="session")
def pg_mirror2() -> Iterator[PgCluster]:
    """A third cluster, started only by tests that ask for it."""
    yield from _cluster("mirror2")


@pytest.fixture
def fresh_db(
    request: pytest.FixtureRequest, pg_primary: PgCluster, pg_mirror: PgCluster
) -> Iterator[str]:
    """A new database, same name, on the primary, the mirror, and mirror2 if
    the test also asks for ``pg_mirror2``. Dropped (sessions forced out) after.
    """
    clusters = [pg_primary, pg_mirror]
    if "pg_mirror2" in request.fixturenames:
        clusters.append(request.getfixturevalue("pg_mirror2"))
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40]
    name = f"t_{stem}_{uuid.uuid4().hex[:8]}"
    for cluster in clusters:
        cluster.create_database(name)
    yield name
    for cluster in clusters:
        if cluster.running:
            try:
                cluster.drop_database(name)
            except PgClusterError:
                pass  # best effort: the cluster goes away at the end of the run


@pytest.fixture
def free_port() -> Callable[..., int]:
    """The :func:`tests.support.net.free_port` function: ``free_port()`` -> int."""
    return _free_port
