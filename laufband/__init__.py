"""laufband: run a DAG of tasks across many worker processes through one shared database."""

from laufband.errors import (
    ConfigError,
    DatabaseError,
    GraphError,
    GraphMismatchError,
    LaufbandError,
    LockTimeoutError,
    SchemaVersionError,
    TaskFailedError,
    WorkerIdentityError,
)
from laufband.graphband import Graphband
from laufband.laufband import Laufband
from laufband.monitor import Monitor
from laufband.task import GraphTraversalProtocol, SizedGraphTraversalProtocol, Task

__version__ = "0.3.0.dev0"

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
    "SchemaVersionError",
    "SizedGraphTraversalProtocol",
    "Task",
    "TaskFailedError",
    "WorkerIdentityError",
    "__version__",
]
