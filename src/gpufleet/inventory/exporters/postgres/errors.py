"""How a psycopg failure is classified and said, for the exporter and for history."""

from __future__ import annotations

import psycopg
import psycopg.errors as pgerr

__all__ = ["error_type", "first_line", "is_permanent"]


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, else its class name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_AUTH_HINTS = ("password authentication failed", "no pg_hba.conf entry", "authentication")
# libpq's words for an SSL setting the server or the client cannot meet
# (``POSTGRES_SSLMODE=require`` against a server without SSL, a CA file that
# is missing): trying again cannot help, so they are configuration errors.
_SSL_CONFIG_HINTS = (
    "does not support ssl",
    "ssl was required",
    "root certificate file",
    "certificate verify failed",
    "server certificate for",
)


def error_type(exc: BaseException) -> str:
    """The ``ExporterError.error_type`` for a psycopg failure."""
    if isinstance(exc, pgerr.InvalidAuthorizationSpecification | pgerr.InsufficientPrivilege):
        return "auth"
    if isinstance(exc, pgerr.UndefinedTable | pgerr.UndefinedColumn | pgerr.InvalidCatalogName):
        return "config"
    if isinstance(exc, pgerr.InvalidColumnReference):
        return "config"  # no unique constraint for ON CONFLICT: a foreign table
    if isinstance(exc, pgerr.QueryCanceled | pgerr.LockNotAvailable | pgerr.ConnectionTimeout):
        return "timeout"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, psycopg.Error) and (exc.sqlstate or "").startswith("40"):
        # Class 40, transaction rollback (a deadlock, a serialisation failure):
        # psycopg's classes for them do not derive from TransactionRollback.
        return "server"
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError):
        # Errors while connecting carry no SQLSTATE; only the text tells why.
        message = str(exc).lower()
        if any(hint in message for hint in _AUTH_HINTS):
            return "auth"
        if any(hint in message for hint in _SSL_CONFIG_HINTS):
            return "config"
        if "does not exist" in message and "database" in message:
            return "config"
        return "connection"
    return "other"


def is_permanent(exc: BaseException) -> bool:
    """Whether the same batch would fail the same way forever."""
    # Bad values (a NUL byte, an out-of-range number), a violated constraint
    # other than the unique key we expect, or a value too large for an index:
    # the same batch will fail the same way forever.
    return isinstance(exc, psycopg.DataError | psycopg.IntegrityError | pgerr.ProgramLimitExceeded)
