"""Database URLs: a password in the user part or the query string is found and never shown."""

from __future__ import annotations

import pytest

from covidcxr import dburl, tuning
from pipelines import _common, tune_unet


@pytest.mark.parametrize("url, secret", [
    ("postgresql+psycopg2://optuna:s3cret@db.example:5432/optuna", "s3cret"),
    # libpq also takes the password from the query: has_password missed it, and logs and MLflow tags showed it
    ("postgresql+psycopg2://optuna@db.example/optuna?password=s3cret&sslmode=require", "s3cret"),
    ("postgresql://optuna@db.example/optuna?sslpassword=k3y", "k3y"),
    ("postgresql://optuna@db.example/optuna?PassWord=s3cret", "s3cret"),
])
def test_a_password_anywhere_in_the_url_is_found_and_hidden(url, secret):
    shown = dburl.shown_url(url)
    assert dburl.has_password(url) and secret not in shown and "db.example" in shown and "optuna" in shown


def test_urls_without_a_password_are_shown_as_they_are():
    for url in ("postgresql+psycopg2://covidcxr@db-host:5432/log?sslmode=require", "sqlite:///predictions.db"):
        assert not dburl.has_password(url) and dburl.shown_url(url) == url
    assert dburl.shown_url("ftp://x@h/z") == "ftp://x@h/z" and dburl.shown_url("ftp://x:y@h/z") == "ftp://x:***@h/z"


@pytest.mark.parametrize("url", [
    "postgresql//u:s3cret@h/db",  # no '://': SQLAlchemy cannot parse it, and it was shown whole
    "postgresql://u:s3cr@t@h/db",  # an unescaped '@' in the password: parsed as password 's3cr', host 't@h'
    "not a url",
])
def test_a_url_that_cannot_be_parsed_safely_counts_as_holding_a_password_and_is_never_shown(url):
    assert dburl.has_password(url) and dburl.shown_url(url) == dburl.UNSHOWN


@pytest.mark.parametrize("url, echoed", [
    ("postgresql+psycopg2://u:s3cret@db/optuna", 'invalid dsn: "user=u password=*** host=db"'),
    ("postgresql+psycopg2://u@db/optuna?password=s3cret", 'invalid dsn: "user=u password=*** host=db"'),
    ("sqlite:///optuna.db", 'invalid dsn: "user=u password=s3cret host=db"'),  # no password in the URL: none to hide
    ("postgresql://u:s3cr@t@db/optuna", "DriverError"),  # cannot be parsed safely: the type alone
])
def test_a_drivers_message_is_shown_without_any_password_the_url_holds(url, echoed):
    """A driver may echo its connection string: the operator gets the reason, never the password (the worker's first
    version hid the user part's password only, and a query password came through whole)."""
    class DriverError(Exception):
        pass

    exc = DriverError('invalid dsn: "user=u password=s3cret host=db"\n(Background on this error at: ...)')
    assert dburl.shown_error(exc, url) == echoed


def test_the_stage_guards_refuse_a_url_that_cannot_be_parsed_safely(monkeypatch):
    monkeypatch.delenv(tuning.STORAGE_ENV, raising=False)
    for url in ("postgresql//u:s3cret@h/db", "postgresql://u:s3cr@t@h/db"):
        with pytest.raises(_common.ParamsError, match="tune_unet.storage") as err:
            tune_unet.storage_url({"storage": url})
        assert "s3cr" not in str(err.value)
    assert dburl.has_password("sqlite:////tmp/a@b/optuna.db") is False  # an '@' in a file path is no password


def test_two_urls_name_the_same_database_whatever_their_passwords():
    base = "postgresql+psycopg2://optuna@db-host:5432/optuna?sslmode=require"
    assert dburl.same_database(base, "postgresql+psycopg2://optuna:s3cret@db-host:5432/optuna?sslmode=require")
    assert dburl.same_database(base, base + "&password=s3cret")
    assert not dburl.same_database(base, base.replace("db-host", "db-other"))
    assert not dburl.same_database(base, base.replace("/optuna?", "/other?"))
    assert not dburl.same_database("postgresql//u@h/db", "postgresql//u@h/db")  # unparsable: never the same
