"""The database a test's workers share: a SQLite file in the test's folder (the default),
or a new database on the PostgreSQL test server (scripts/postgres-up.sh).

Tests and modules marked ``backends`` run once per backend (conftest.py parametrises
them); ``current`` is the backend of the running test, so helpers that build a worker's
URL or read the database for checks need no argument for it.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from pathlib import Path

import sqlalchemy as sa


class Backend:
    def __init__(self, kind: str, server: str = "") -> None:
        self.kind = kind
        self.server = server  # the PostgreSQL server's URL (any database on it)
        self._made: dict[str, str] = {}

    @property
    def sqlite(self) -> bool:
        return self.kind.startswith("sqlite")  # "sqlite-exclusive": SQLITE_LOCKING

    def url(self, name: str | Path = "graph.sqlite") -> str:
        """The URL of the test's database ``name`` (a file name; for PostgreSQL a new
        database per distinct name, made at the first call)."""
        if self.sqlite:
            return f"sqlite:///{os.path.abspath(name)}"
        key = os.path.abspath(name)
        if key not in self._made:
            database = f"lbt_{uuid.uuid4().hex[:16]}"
            self._admin(f'CREATE DATABASE "{database}"')
            self._made[key] = sa.engine.make_url(self.server).set(
                database=database).render_as_string(hide_password=False)
        return self._made[key]

    def exists(self, name: str | Path = "graph.sqlite") -> bool:
        if self.sqlite:
            return Path(name).exists()
        return os.path.abspath(name) in self._made

    def rows(self, sql: str, params: tuple = (), name: str | Path = "graph.sqlite"
             ) -> list[tuple]:
        """Read the database directly (for checks); ``?`` placeholders. Any error raises:
        a check must never pass because the database is not there (yet)."""
        if self.sqlite:
            if not Path(name).exists():
                raise AssertionError(f"no database at {name}")
            conn = sqlite3.connect(f"file:{os.path.abspath(name)}?mode=ro", uri=True,
                                   timeout=30)
            try:
                return conn.execute(sql, params).fetchall()
            finally:
                conn.close()
        if not self.exists(name):
            raise AssertionError(f"no database for {name}")
        import psycopg

        with psycopg.connect(_conninfo(self.url(name)), autocommit=True) as conn:
            return [tuple(r) for r in conn.execute(sql.replace("?", "%s"), params)]

    def execute(self, sql: str, name: str | Path = "graph.sqlite") -> None:
        """Run a statement that returns no rows on the PostgreSQL test database ``name``
        (to set up a state, e.g. an older schema)."""
        import psycopg

        assert not self.sqlite and self.exists(name), name
        with psycopg.connect(_conninfo(self.url(name)), autocommit=True) as conn:
            conn.execute(sql)

    def missing_table(self, exc: Exception) -> bool:
        """Is ``exc`` a read of a table that is not made yet?"""
        return "no such table" in str(exc) or "does not exist" in str(exc)

    def drop_all(self) -> None:
        for url in self._made.values():
            self._admin(f'DROP DATABASE IF EXISTS "{sa.engine.make_url(url).database}"'
                        " WITH (FORCE)")
        self._made.clear()

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(_conninfo(self.server), autocommit=True) as conn:
            conn.execute(sql)


def _conninfo(url: str) -> str:
    """A libpq URL from a SQLAlchemy one (no '+psycopg')."""
    return sa.engine.make_url(url).set(drivername="postgresql").render_as_string(
        hide_password=False)


SQLITE = Backend("sqlite")
#: The backend of the running test (conftest.py's ``backend`` fixture sets it).
current = SQLITE
