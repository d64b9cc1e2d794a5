"""The prediction log on a real PostgreSQL server: an earlier version's table migrated on first write, and a record
with non-finite numbers stored (as None) with the rest of its batch."""

from __future__ import annotations

import pytest

from tests.test_predlog import check_migration, check_non_finite

pytestmark = pytest.mark.infra


def test_a_postgres_log_of_an_earlier_version_gains_the_missing_columns(postgres, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    check_migration(postgres.create_database("predictions_migration"))


def test_a_postgres_log_stores_a_batch_holding_non_finite_numbers(postgres, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    check_non_finite(postgres.create_database("predictions_non_finite"))
