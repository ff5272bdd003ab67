"""Keeping a long-lived workflow database small: ``prune``."""

from __future__ import annotations

from laufband.errors import ConfigError
from laufband.store import Store, database_url
from laufband.store.connection import absolute_url
from laufband.store.pruning import Pruned


def prune(db: str, keep: int = 10, vacuum: bool = False) -> Pruned:
    """Delete the history a workflow no longer needs: per task, all but the newest
    ``keep`` events and ended attempts (its live attempts, its latest attempt and its
    latest completed one always stay). Safe while workers run: short transactions. With
    ``vacuum``, shrink the file (workers wait for that). Returns what was deleted."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"keep={keep!r} is invalid: it must be an integer >= 1.")
    return Store.open_existing(absolute_url(database_url(db))).prune(keep, vacuum)
