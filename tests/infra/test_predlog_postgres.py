"""The prediction log on a real PostgreSQL server: an earlier version's table migrated on first write."""

from __future__ import annotations

import pytest

from tests.test_predlog import check_migration

pytestmark = pytest.mark.infra


def test_a_postgres_log_of_an_earlier_version_gains_the_missing_columns(postgres, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    check_migration(postgres.create_database("predictions_migration"))
