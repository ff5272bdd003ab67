"""Settings: explicit argument > LAUFBAND_* variable (read at creation) > default."""

from __future__ import annotations

import pytest
from helpers import flat_worker

from laufband import ConfigError, Laufband


def test_environment_is_read_at_creation_not_import(monkeypatch):
    monkeypatch.setenv("LAUFBAND_HEARTBEAT_TIMEOUT", "90")
    monkeypatch.setenv("LAUFBAND_HEARTBEAT_INTERVAL", "5")
    monkeypatch.setenv("LAUFBAND_MAX_FAILED_RETRIES", "2")
    monkeypatch.setenv("LAUFBAND_MAX_KILLED_RETRIES", "3")
    monkeypatch.setenv("LAUFBAND_FAILURE_POLICY", "stop")
    monkeypatch.setenv("LAUFBAND_IDENTIFIER", "job-42")
    s = Laufband([1], tqdm_kwargs={"disable": True}).settings
    assert (s.heartbeat_timeout, s.heartbeat_interval) == (90, 5)
    assert (s.max_failed_retries, s.max_killed_retries) == (2, 3)
    assert s.failure_policy == "stop" and s.identifier == "job-42"


def test_explicit_argument_beats_environment(monkeypatch):
    monkeypatch.setenv("LAUFBAND_MAX_FAILED_RETRIES", "2")
    assert flat_worker([1], max_failed_retries=0).settings.max_failed_retries == 0


def test_identifier_may_be_a_callable():
    assert flat_worker([1], name=lambda: "from-callable").identifier == "from-callable"


@pytest.mark.parametrize("kwargs, message", [
    ({"failure_policy": "explode"}, "failure_policy"),
    ({"heartbeat_interval": 60, "heartbeat_timeout": 30}, "less than heartbeat_timeout"),
    ({"heartbeat_interval": 0}, "heartbeat_interval must be > 0"),
    ({"max_failed_retries": -1}, "max_failed_retries"),
    ({"max_killed_retries": 1.5}, "max_killed_retries"),
    ({"labels": "gpu"}, "labels must be a set of strings"),
    ({"journal_mode": "memory"}, "journal_mode"),
])
def test_invalid_parameters(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        flat_worker([1], **kwargs)


def test_invalid_environment_value(monkeypatch):
    monkeypatch.setenv("LAUFBAND_HEARTBEAT_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="LAUFBAND_HEARTBEAT_TIMEOUT='soon'"):
        Laufband([1])
    monkeypatch.setenv("LAUFBAND_HEARTBEAT_TIMEOUT", "60")
    monkeypatch.setenv("LAUFBAND_DISABLED", "maybe")
    with pytest.raises(ConfigError, match="LAUFBAND_DISABLED"):
        Laufband([1])
