"""Settings: explicit argument > LAUFBAND_* variable (read at creation) > default."""

from __future__ import annotations

import os

import pytest
from helpers import flat_worker

from laufband import ConfigError, Laufband, Monitor
from laufband.store.connection import database_url, sqlite_path


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
    ({"failure_policy": "explode"}, "failure_policy='explode' is invalid: use one of"),
    ({"heartbeat_interval": 60, "heartbeat_timeout": 30}, "less than heartbeat_timeout"),
    ({"heartbeat_interval": 0}, "heartbeat_interval=0 is invalid: it must be > 0"),
    ({"heartbeat_interval": float("nan")}, "heartbeat_interval=nan .* finite"),
    ({"heartbeat_timeout": float("inf")}, "heartbeat_timeout=inf .* finite"),
    ({"heartbeat_interval": True}, "heartbeat_interval=True .* got bool"),
    ({"max_failed_retries": -1}, "max_failed_retries=-1 is invalid: it must be >= 0"),
    ({"max_killed_retries": 1.5}, "max_killed_retries=1.5 is invalid: expected an integer"),
    ({"batch_size": 0}, "batch_size=0 is invalid: it must be >= 1"),
    ({"labels": "gpu"}, "labels must be a set of strings"),
    ({"journal_mode": "memory"}, "journal_mode='memory' is invalid: use one of"),
    ({"identifier": 42}, "identifier must be a string"),
    ({"label_wait": -1}, "label_wait=-1 is invalid: it must be >= 0"),
    ({"db": "postgresql+nodriver://x/y"}, "db='postgresql\\+nodriver://x/y' is neither"),
])
def test_invalid_parameters(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Laufband([1], tqdm_kwargs={"disable": True}, **kwargs)
    assert os.listdir(".") == []  # nothing was created


@pytest.mark.parametrize("name, value, message", [
    ("LAUFBAND_HEARTBEAT_TIMEOUT", "soon", "LAUFBAND_HEARTBEAT_TIMEOUT='soon' is invalid: "
     "not a number"),
    ("LAUFBAND_HEARTBEAT_INTERVAL", "nan", "LAUFBAND_HEARTBEAT_INTERVAL='nan' .* finite"),
    ("LAUFBAND_LOCK_LIFETIME", "abc", "LAUFBAND_LOCK_LIFETIME='abc' is invalid: not a number"),
    ("LAUFBAND_LOCK_LIFETIME", "0", "LAUFBAND_LOCK_LIFETIME='0' is invalid: it must be >= 0.3"),
    ("LAUFBAND_MAX_FAILED_RETRIES", "two", "LAUFBAND_MAX_FAILED_RETRIES='two' is invalid: "
     "not an integer"),
    ("LAUFBAND_MAX_KILLED_RETRIES", "-2", "LAUFBAND_MAX_KILLED_RETRIES='-2' .* >= 0"),
    ("LAUFBAND_BATCH_SIZE", "lots", "LAUFBAND_BATCH_SIZE='lots' is invalid"),
    ("LAUFBAND_DISABLED", "maybe", "LAUFBAND_DISABLED='maybe' is invalid: not a boolean"),
    ("LAUFBAND_FAILURE_POLICY", "panic", "LAUFBAND_FAILURE_POLICY='panic' is invalid"),
    ("LAUFBAND_JOURNAL_MODE", "off", "LAUFBAND_JOURNAL_MODE='off' is invalid"),
    ("LAUFBAND_DB", "nosuchdialect://x", "LAUFBAND_DB='nosuchdialect://x' is neither"),
    ("LAUFBAND_LABEL_WAIT", "1min", "LAUFBAND_LABEL_WAIT='1min' is invalid: not a number"),
])
def test_invalid_environment_value(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        Laufband([1], tqdm_kwargs={"disable": True})
    assert os.listdir(".") == []


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_a_plain_path_is_a_sqlite_database(monkeypatch, how):
    os.mkdir("runs")
    kwargs = {"tqdm_kwargs": {"disable": True}}
    if how == "argument":
        kwargs["db"] = "runs/wf.sqlite"
    else:
        monkeypatch.setenv("LAUFBAND_DB", "runs/wf.sqlite")
    assert list(Laufband(["x", "y"], **kwargs)) == ["x", "y"]
    assert os.path.exists("runs/wf.sqlite")
    absolute = os.path.abspath("runs/wf2.sqlite")
    assert list(Laufband(["z"], db=absolute, tqdm_kwargs={"disable": True})) == ["z"]
    assert os.path.exists(absolute)


@pytest.mark.parametrize("name", ["run?1.sqlite", "50%25.sqlite", "hash#1.sqlite",
                                  "x@y:z.sqlite", "sp ace.sqlite"])
def test_a_path_is_that_file_whatever_its_characters(name):
    for _ in Laufband([1, 2], db=name, tqdm_kwargs={"disable": True}):
        pass
    assert name in os.listdir(".")
    assert sqlite_path(database_url(name)) == name


def test_a_relative_database_stays_the_same_file_after_chdir():
    """The loop body changes the current folder: the worker keeps its database."""
    home = os.getcwd()
    os.mkdir("elsewhere")
    worker = Laufband([1, 2, 3], db="wf.sqlite", tqdm_kwargs={"disable": True})
    seen = []
    try:
        for item in worker:
            seen.append(item)
            os.chdir(os.path.join(home, "elsewhere"))
        assert os.listdir(".") == []  # nothing was created in elsewhere/
    finally:
        os.chdir(home)
    assert seen == [1, 2, 3]
    assert Monitor(db="wf.sqlite").get_workflow().counts["completed"] == 3


def test_default_retry_budgets():
    s = Laufband([1], tqdm_kwargs={"disable": True}).settings
    assert (s.max_failed_retries, s.max_killed_retries) == (0, 2)


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://u:s3cret@h/db", "postgresql+psycopg://u:***@h/db"),
    ("postgresql+psycopg://u@h/db?password=s3cret&sslmode=require",
     "postgresql+psycopg://u@h/db?password=***&sslmode=require"),
    ("postgresql+psycopg://u@h/db?sslpassword=s3cret", "postgresql+psycopg://u@h/db?sslpassword=***"),
    ("postgresql+psycopg://u:s3cret@h:54x9/db", "postgresql+psycopg://u:***@h:54x9/db"),
    ("postgres:s3cret@h:54x9", "postgres:***@h:54x9"),  # no URL: masked by pattern
    ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    ("runs/a:b.sqlite", "runs/a:b.sqlite"),
])
def test_a_password_in_a_url_is_masked_for_display(url, shown):
    from laufband.store.connection import display_url, has_secret

    assert display_url(url) == shown
    assert has_secret(url) == ("s3cret" in url)


def test_an_unparsable_url_with_a_password_is_masked_in_the_error():
    from laufband.store.connection import database_url

    with pytest.raises(ConfigError) as exc:
        database_url("postgresql+psycopg://postgres:s3cret@127.0.0.1:54x29", "db")
    assert "s3cret" not in str(exc.value) and "postgres:***@" in str(exc.value)


def test_a_server_url_whose_driver_is_missing_says_what_to_install(monkeypatch):
    """A postgresql+psycopg:// URL without psycopg installed (laufband without its
    [postgres] extra) is refused up front with what to install, not with an import
    error from inside SQLAlchemy at the first connection; the password stays masked."""
    import sys

    from laufband import Graphband, Task

    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` fails
    with pytest.raises(ConfigError) as exc:
        Graphband([Task("a")], db="postgresql+psycopg://u:s3cret@127.0.0.1:1/x")
    message = str(exc.value)
    assert "pip install 'laufband[postgres]'" in message and "'psycopg'" in message
    assert "s3cret" not in message and "u:***@" in message
