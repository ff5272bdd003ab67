"""laufband: run a DAG of tasks across many worker processes through one shared database."""

import logging
import sys

from tqdm import tqdm

from laufband.errors import (
    ConfigError,
    DatabaseError,
    GraphError,
    GraphMismatchError,
    LaufbandError,
    LockTimeoutError,
    ResultError,
    SchemaVersionError,
    TaskFailedError,
    WorkerIdentityError,
)
from laufband.fingerprints import fingerprint
from laufband.graphband import Graphband
from laufband.laufband import Laufband
from laufband.maintenance import prune
from laufband.monitor import Monitor
from laufband.task import GraphTraversalProtocol, SizedGraphTraversalProtocol, Task

__version__ = "0.3.0.dev0"


class _LastResort(logging.Handler):
    """Where the application configured no logging, laufband's warnings go to stderr as
    Python's last resort would, but through tqdm: not onto a progress bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        if self._others_handle(record):
            return  # the application configured logging: its handlers get it
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)

    def _others_handle(self, record: logging.LogRecord) -> bool:
        """Would another handler see the record (as Python decides on its last resort)?"""
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return True
            if not logger.propagate:
                return False
            logger = logger.parent  # type: ignore[assignment]
        return False


logging.getLogger("laufband").addHandler(_LastResort(logging.WARNING))

__all__ = [
    "ConfigError",
    "DatabaseError",
    "GraphError",
    "GraphMismatchError",
    "GraphTraversalProtocol",
    "Graphband",
    "Laufband",
    "LaufbandError",
    "LockTimeoutError",
    "Monitor",
    "ResultError",
    "SchemaVersionError",
    "SizedGraphTraversalProtocol",
    "Task",
    "TaskFailedError",
    "WorkerIdentityError",
    "__version__",
    "fingerprint",
    "prune",
]
