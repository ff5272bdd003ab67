"""Worker settings: explicit argument > ``LAUFBAND_*`` environment variable > default.

The environment is read when a worker is created (not at import), so a job script can
export variables after ``import laufband``. Every value is checked, and an error names
where it came from (the argument or the variable), what is wrong and what would do.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import typing as t
from collections.abc import Callable, Iterable, Mapping

from laufband.errors import ConfigError
from laufband.locking import DEFAULT_LIFETIME
from laufband.store.connection import database_url
from laufband.store.resources import check_limits

FAILURE_POLICIES = ("continue", "stop")
#: ``delete`` is the default: safe on NFS (``wal`` needs memory shared by one host) and
#: there the cheapest. ``truncate`` trades the journal's unlink for a truncate and an
#: fsync; ``persist`` keeps a journal that every transaction must open and check for a
#: hot one, and syncs its zeroed header: 18 / 19 / 21 round trips per transaction on
#: the database (SCALING_ANALYSIS.md, 'NFS'). All three are crash-safe.
JOURNAL_MODES = ("delete", "truncate", "persist", "wal")
#: A task whose worker died (node failure, OOM kill, scancel without a grace period)
#: runs again up to this many times by default: one crashed node does not block a
#: workflow, and a task that keeps killing its worker stops after 3 attempts.
DEFAULT_MAX_KILLED_RETRIES = 2
#: Largest task result (its JSON, in bytes): results are for small values (paths, ids,
#: metrics) that dependents read; big data belongs in files.
DEFAULT_RESULT_SIZE = 65536
#: Seconds before its allocation ends in which a worker starts nothing: the time to
#: record the last task, hand back the rest and exit cleanly before SLURM's SIGTERM
#: (a few seconds; a minute also covers a slow shared file system, clock skew between
#: the node and the controller, and runtimes a little longer than estimated).
DEFAULT_WALLTIME_MARGIN = 60.0
#: Seconds a worker waits for a live worker with the labels its tasks' dependencies
#: need before it leaves them behind: the job arrays of a pipeline's stages start in
#: any order (the scheduler's), and a worker registers a second or so after its job
#: starts. Short enough that a stage nobody started costs a minute, not an allocation.
DEFAULT_LABEL_WAIT = 60.0


@dataclasses.dataclass(frozen=True)
class Settings:
    db: str
    identifier: str
    failure_policy: str
    heartbeat_timeout: float
    heartbeat_interval: float
    max_killed_retries: int
    max_failed_retries: int
    disabled: bool
    labels: frozenset[str]
    journal_mode: str
    batch_size: int | str
    lock_lifetime: float
    enable_fingerprints: bool = False
    invalidate_downstream: bool = True
    limits: t.Mapping[str, int] = dataclasses.field(default_factory=dict)
    depth_first: bool = False
    max_result_size: int = 65536
    walltime_margin: float = DEFAULT_WALLTIME_MARGIN
    label_wait: float = DEFAULT_LABEL_WAIT


class _Source(t.NamedTuple):
    """A value and where it came from, for error messages."""

    value: t.Any
    origin: str  # "heartbeat_interval=..." or "LAUFBAND_HEARTBEAT_INTERVAL=..."

    def fail(self, what: str) -> t.NoReturn:
        raise ConfigError(f"{self.origin} is invalid: {what}.")


def _pick(value: t.Any, env: Mapping[str, str], param: str, var: str, default: t.Any
          ) -> _Source:
    if value is not None:
        return _Source(value, f"{param}={value!r}")
    if var in env:
        return _Source(env[var], f"{var}={env[var]!r}")
    return _Source(default, f"{param} (default {default!r})")


def _number(src: _Source, kind: type, minimum: float, strict: bool) -> t.Any:
    """An int or finite float >= (or >, with ``strict``) ``minimum``."""
    value = src.value
    if isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            src.fail(f"not {'an integer' if kind is int else 'a number'}")
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            kind is int and not isinstance(value, int)):
        src.fail(f"expected {'an integer' if kind is int else 'a number'}, got "
                 f"{type(value).__name__}")
    if not math.isfinite(value):
        src.fail("it must be a finite number")
    if value < minimum or (strict and value == minimum):
        src.fail(f"it must be {'>' if strict else '>='} {minimum:g}")
    return value


def _choice(src: _Source, choices: tuple[str, ...], hint: str = "") -> str:
    value = src.value.strip().lower() if isinstance(src.value, str) else src.value
    if value not in choices:
        src.fail(f"use one of {', '.join(choices)}{hint}")
    return value


def choice_from_environment(var: str, choices: tuple[str, ...], default: str,
                            env: Mapping[str, str] | None = None, hint: str = "") -> str:
    """A setting only a variable sets, checked as ``resolve`` checks the others: for
    code that runs where no ``Settings`` are made (the store of ``Monitor`` and the
    CLI). ``hint``: appended to the list of choices in the error."""
    env = os.environ if env is None else env
    return _choice(_pick(None, env, var, var, default), choices, hint)


def _bool(src: _Source) -> bool:
    if isinstance(src.value, bool):
        return src.value
    value = str(src.value).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    src.fail("not a boolean; use 1 or 0")


def _batch(src: _Source) -> int | str:
    if isinstance(src.value, str) and src.value.strip().lower() == "auto":
        return "auto"
    try:
        return _number(src, int, 1, strict=False)
    except ConfigError as exc:
        raise ConfigError(f"{exc} Use auto or an integer >= 1.") from None


def _labels(labels: Iterable[str] | None) -> frozenset[str]:
    if labels is None:
        return frozenset()
    if isinstance(labels, str | bytes):
        raise ConfigError(f"labels must be a set of strings, got the string {labels!r}.")
    result = frozenset(labels)
    if not all(isinstance(label, str) and label for label in result):
        raise ConfigError(f"labels must be non-empty strings, got {sorted(map(repr, result))}.")
    return result


def _identifier(identifier: str | Callable[[], str] | None, env: Mapping[str, str]) -> str:
    ident = identifier() if callable(identifier) else identifier
    if ident is not None and not isinstance(ident, str):
        raise ConfigError(f"identifier must be a string, got {type(ident).__name__} {ident!r}.")
    ident = (ident or "").strip() or env.get("LAUFBAND_IDENTIFIER", "").strip()
    return ident or f"{socket.gethostname()}:{os.getpid()}"


def resolve(
    *,
    db: str | None,
    default_db: str,
    identifier: str | Callable[[], str] | None,
    failure_policy: str | None,
    heartbeat_timeout: float | None,
    heartbeat_interval: float | None,
    max_killed_retries: int | None,
    max_failed_retries: int | None,
    disabled: bool | None,
    labels: Iterable[str] | None,
    journal_mode: str | None,
    batch_size: int | str | None = None,
    enable_fingerprints: bool | None = None,
    invalidate_downstream: bool | None = None,
    limits: Mapping[str, int] | None = None,
    depth_first: bool | None = None,
    max_result_size: int | None = None,
    walltime_margin: float | None = None,
    label_wait: float | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    env = os.environ if env is None else env

    def pick(value: t.Any, name: str, default: t.Any) -> _Source:
        return _pick(value, env, name, f"LAUFBAND_{name.upper()}", default)

    db_src = pick(db, "db", default_db)
    interval = _number(pick(heartbeat_interval, "heartbeat_interval", 30), float, 0, True)
    timeout = _number(pick(heartbeat_timeout, "heartbeat_timeout", 60), float, 0, True)
    if interval >= timeout:
        raise ConfigError(
            "heartbeat_interval must be less than heartbeat_timeout "
            f"({interval:g} >= {timeout:g}); a timeout of at least twice the interval is "
            "recommended.")
    return Settings(
        db=database_url(db_src.value, db_src.origin.split("=")[0]),
        identifier=_identifier(identifier, env),
        failure_policy=_choice(pick(failure_policy, "failure_policy", "continue"),
                               FAILURE_POLICIES),
        heartbeat_timeout=timeout,
        heartbeat_interval=interval,
        max_killed_retries=_number(pick(max_killed_retries, "max_killed_retries",
                                        DEFAULT_MAX_KILLED_RETRIES), int, 0, False),
        max_failed_retries=_number(pick(max_failed_retries, "max_failed_retries", 0),
                                   int, 0, False),
        disabled=_bool(pick(disabled, "disabled", False)),
        labels=_labels(labels),
        journal_mode=_choice(pick(journal_mode, "journal_mode", "delete"), JOURNAL_MODES),
        batch_size=_batch(pick(batch_size, "batch_size", "auto")),
        # Environment only: a tuning knob for tests and odd file systems. Below ~0.3 s
        # the heartbeat thread (which refreshes it every third) cannot keep up.
        lock_lifetime=_number(pick(None, "lock_lifetime", DEFAULT_LIFETIME), float, 0.3,
                              False),
        enable_fingerprints=_bool(pick(enable_fingerprints, "enable_fingerprints", False)),
        invalidate_downstream=_bool(pick(invalidate_downstream, "invalidate_downstream",
                                         True)),
        limits=check_limits(limits if limits is not None else {}, "limits"),
        depth_first=_bool(pick(depth_first, "depth_first", False)),
        max_result_size=_number(pick(max_result_size, "max_result_size", DEFAULT_RESULT_SIZE),
                                int, 1, False),
        walltime_margin=_number(pick(walltime_margin, "walltime_margin",
                                     DEFAULT_WALLTIME_MARGIN), float, 0, False),
        label_wait=_number(pick(label_wait, "label_wait", DEFAULT_LABEL_WAIT), float, 0,
                           False),
    )
