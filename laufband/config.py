"""Worker settings: explicit argument > ``LAUFBAND_*`` environment variable > default.

The environment is read when a worker is created (not at import), so a job script can
export variables after ``import laufband``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import typing as t
from collections.abc import Callable, Iterable, Mapping

from laufband.errors import ConfigError

FAILURE_POLICIES = ("continue", "stop")
JOURNAL_MODES = ("delete", "truncate", "persist", "wal")


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


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use 1 or 0.")


def _parse_number(name: str, raw: str, kind: type) -> t.Any:
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}.") from None


def _pick(value: t.Any, env: Mapping[str, str], name: str, default: t.Any, parse) -> t.Any:
    if value is not None:
        return value
    if name in env:
        return parse(name, env[name])
    return default


def _default_identifier() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


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
    env: Mapping[str, str] | None = None,
) -> Settings:
    env = os.environ if env is None else env
    num = _parse_number
    ident = identifier() if callable(identifier) else identifier
    ident = _pick(ident or None, env, "LAUFBAND_IDENTIFIER", None, lambda n, r: r.strip())
    settings = Settings(
        db=_pick(db, env, "LAUFBAND_DB", default_db, lambda n, r: r),
        identifier=ident or _default_identifier(),
        failure_policy=_pick(
            failure_policy, env, "LAUFBAND_FAILURE_POLICY", "continue", lambda n, r: r
        ),
        heartbeat_timeout=_pick(
            heartbeat_timeout, env, "LAUFBAND_HEARTBEAT_TIMEOUT", 60,
            lambda n, r: num(n, r, float),
        ),
        heartbeat_interval=_pick(
            heartbeat_interval, env, "LAUFBAND_HEARTBEAT_INTERVAL", 30,
            lambda n, r: num(n, r, float),
        ),
        max_killed_retries=_pick(
            max_killed_retries, env, "LAUFBAND_MAX_KILLED_RETRIES", 0,
            lambda n, r: num(n, r, int),
        ),
        max_failed_retries=_pick(
            max_failed_retries, env, "LAUFBAND_MAX_FAILED_RETRIES", 0,
            lambda n, r: num(n, r, int),
        ),
        disabled=_pick(disabled, env, "LAUFBAND_DISABLED", False, _parse_bool),
        labels=_labels(labels),
        journal_mode=_pick(
            journal_mode, env, "LAUFBAND_JOURNAL_MODE", "delete", lambda n, r: r
        ).lower(),
        batch_size=_pick(batch_size, env, "LAUFBAND_BATCH_SIZE", "auto", _parse_batch),
    )
    _check(settings)
    return settings


def _parse_batch(name: str, raw: str) -> int | str:
    raw = raw.strip().lower()
    return raw if raw == "auto" else _parse_number(name, raw, int)


def _labels(labels: Iterable[str] | None) -> frozenset[str]:
    if labels is None:
        return frozenset()
    if isinstance(labels, str | bytes):
        raise ConfigError(f"labels must be a set of strings, got the string {labels!r}.")
    result = frozenset(labels)
    if not all(isinstance(label, str) and label for label in result):
        raise ConfigError(f"labels must be non-empty strings, got {sorted(map(repr, result))}.")
    return result


def _check(s: Settings) -> None:
    if s.failure_policy not in FAILURE_POLICIES:
        raise ConfigError(
            f"failure_policy must be one of {FAILURE_POLICIES}, got {s.failure_policy!r}."
        )
    if s.heartbeat_interval <= 0:
        raise ConfigError(f"heartbeat_interval must be > 0 seconds, got {s.heartbeat_interval}.")
    if s.heartbeat_interval >= s.heartbeat_timeout:
        raise ConfigError(
            "heartbeat_interval must be less than heartbeat_timeout "
            f"({s.heartbeat_interval} >= {s.heartbeat_timeout}); "
            "a timeout of at least twice the interval is recommended."
        )
    for name in ("max_killed_retries", "max_failed_retries"):
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {value!r}.")
    b = s.batch_size
    if b != "auto" and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
        raise ConfigError(f"batch_size must be 'auto' or an integer >= 1, got {b!r}.")
    if s.journal_mode not in JOURNAL_MODES:
        raise ConfigError(f"journal_mode must be one of {JOURNAL_MODES}, got {s.journal_mode!r}.")
    if not isinstance(s.identifier, str) or not s.identifier.strip():
        raise ConfigError(f"identifier must be a non-empty string, got {s.identifier!r}.")
