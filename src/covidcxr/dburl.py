"""Database URLs (the prediction log's, an Optuna study's): where a password may hide in one, and how one is shown.

SQLAlchemy takes a password in the URL's user part (``user:secret@host``) and, for PostgreSQL through libpq, in its
query string (``?password=secret``): both count, and both are hidden when a URL is logged, tagged or reported. A string
SQLAlchemy cannot parse, or parses with an ``@`` left in the host (``user:p@ss@host``: an unescaped ``@`` in the
password), may hold a password anywhere: it counts as holding one and is never shown.
"""

from __future__ import annotations

#: Query keys that carry a secret (libpq's ``password`` and ``sslpassword``, and common spellings), any case.
SECRET_KEYS: frozenset[str] = frozenset({"password", "sslpassword", "passwd", "pwd"})

#: What :func:`shown_url` shows of a URL it cannot split safely into its parts.
UNSHOWN = "<unparsable URL>"


def _parsed(url: str):
    """The SQLAlchemy URL, or None when ``url`` is none or may have been split in the middle of its password."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL
        return None
    return None if "@" in (parsed.host or "") else parsed


def has_password(url: str) -> bool:
    """Whether an SQLAlchemy URL carries a password, in its user part or its query (it must come from the environment:
    ``PGPASSWORD``, ``~/.pgpass``); True for what cannot be parsed safely, where no one can tell."""
    parsed = _parsed(url)
    return parsed is None or parsed.password is not None or any(key.lower() in SECRET_KEYS for key in parsed.query)


def same_database(a: str, b: str) -> bool:
    """Whether two URLs name the same database (driver, user, host, port, database, query), passwords aside; False
    when either cannot be parsed safely."""
    first, second = _parsed(a), _parsed(b)
    if first is None or second is None:
        return False

    def bare(parsed) -> tuple:
        query = {k: v for k, v in parsed.query.items() if k.lower() not in SECRET_KEYS}
        return parsed.drivername, parsed.username, parsed.host, parsed.port, parsed.database, query

    return bare(first) == bare(second)


def shown_url(url: str) -> str:
    """The URL for logs, tags and reports: a password, in the user part or the query, as ``***``; :data:`UNSHOWN` for
    what cannot be parsed safely."""
    parsed = _parsed(url)
    if parsed is None:
        return UNSHOWN
    hidden = {key: ("***" if key.lower() in SECRET_KEYS else value) for key, value in parsed.query.items()}
    return parsed.set(query=hidden).render_as_string(hide_password=True)


def shown_error(exc: BaseException, url: str) -> str:
    """A database error for someone who runs the command: the driver's own message, first line (SQLAlchemy appends
    the statement and a link on later lines), with every password the URL holds (user part or query) as ``***``; only
    the error's type when the URL cannot be parsed safely (a password may then be anywhere). A driver may echo its
    connection string, so the text is never shown as it comes. Logs read by others (the prediction log's) show the
    type alone."""
    parsed = _parsed(url)
    if parsed is None:
        return type(exc).__name__
    text = str(getattr(exc, "orig", None) or exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    secrets = [str(parsed.password)] if parsed.password else []
    for key, value in parsed.query.items():
        if key.lower() in SECRET_KEYS:
            secrets += [value] if isinstance(value, str) else list(value)
    for secret in sorted(set(secrets) - {""}, key=len, reverse=True):  # the longest first: one may hold another
        line = line.replace(secret, "***")
    return line
