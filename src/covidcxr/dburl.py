"""Database URLs (the prediction log's, an Optuna study's): where a password may hide in one, and how one is shown.

SQLAlchemy takes a password in the URL's user part (``user:secret@host``) and, for PostgreSQL through libpq, in its
query string (``?password=secret``): both count, and both are hidden when a URL is logged, tagged or reported.
"""

from __future__ import annotations

#: Query keys that carry a secret (libpq's ``password`` and ``sslpassword``, and common spellings), any case.
SECRET_KEYS: frozenset[str] = frozenset({"password", "sslpassword", "passwd", "pwd"})


def has_password(url: str) -> bool:
    """Whether an SQLAlchemy URL carries a password, in its user part or its query (it must come from the environment:
    ``PGPASSWORD``, ``~/.pgpass``); False for what is not an SQLAlchemy URL (nothing to leak)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL
        return False
    return parsed.password is not None or any(key.lower() in SECRET_KEYS for key in parsed.query)


def shown_url(url: str) -> str:
    """The URL for logs, tags and reports: a password, in the user part or the query, as ``***``; only the scheme of
    what is not an SQLAlchemy URL."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001
        return url.split("://", 1)[0] + "://..."
    hidden = {key: ("***" if key.lower() in SECRET_KEYS else value) for key, value in parsed.query.items()}
    return parsed.set(query=hidden).render_as_string(hide_password=True)
