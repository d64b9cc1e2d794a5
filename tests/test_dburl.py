"""Database URLs: a password in the user part or the query string is found and never shown."""

from __future__ import annotations

import pytest

from covidcxr import dburl


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
    assert not dburl.has_password("not a url") and dburl.shown_url("ftp://x:y@h/z").startswith("ftp://")
