"""Every error laufband raises derives from :class:`LaufbandError`.

Each subclass also derives from the built-in category that fits, so ``except ValueError``
in existing scripts keeps working, and each message says what is wrong and what to do.
All of them are picklable: they cross process boundaries in tests and user pools.
"""

from __future__ import annotations


class LaufbandError(Exception):
    """Base class of all laufband errors."""


class GraphError(LaufbandError, ValueError):
    """The tasks given to a worker do not form a valid graph (checked before any write)."""


class GraphMismatchError(GraphError):
    """This worker's graph contradicts the graph already stored in the database."""


class WorkerIdentityError(LaufbandError, ValueError):
    """Another live worker already uses this identifier."""


class ConfigError(LaufbandError, ValueError):
    """A parameter or ``LAUFBAND_*`` environment variable has an invalid value."""


class DatabaseError(LaufbandError, RuntimeError):
    """The database is missing, unreadable, read-only, corrupt or otherwise unusable."""


class SchemaVersionError(DatabaseError):
    """The database was written by an incompatible version of laufband."""


class LockTimeoutError(LaufbandError, TimeoutError):
    """The database lock could not be acquired in time."""


class TaskFailedError(LaufbandError, RuntimeError):
    """``failure_policy="stop"``: a task of this workflow has failed, so this worker stops."""


class ResultError(LaufbandError, ValueError):
    """A task result that cannot be stored (not JSON, too large), or one asked for that
    does not exist (the task has not completed)."""
