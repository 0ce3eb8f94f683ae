"""``EXPORTER_TYPE=postgres`` settings: gpuid's ``POSTGRES_*`` variables, plus pool tuning."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, ValidationInfo, field_validator

from gpufleet.core.config import Duration, GpufleetSettings

__all__ = ["PostgresSettings", "SqlIdentifier", "SslMode"]

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]

# What an unquoted identifier may be in PostgreSQL (63 bytes at most), and what
# gpuid accepted for POSTGRES_TABLE.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_IDENTIFIER_HINT = (
    "expected a plain SQL identifier: a letter or _, then letters, digits or _, "
    "at most 63 characters"
)


def _plain_identifier(value: object) -> object:
    if not isinstance(value, str):
        return value
    if not _IDENTIFIER.fullmatch(value):
        raise ValueError(_IDENTIFIER_HINT)
    # gpuid pasted the name unquoted, so PostgreSQL folded it to lower case; we
    # quote it, so fold it here to keep writing the table a gpuid user has.
    return value.lower()


SqlIdentifier = Annotated[str, BeforeValidator(_plain_identifier)]


class PostgresSettings(GpufleetSettings):
    """``EXPORTER_TYPE=postgres``: gpuid's ``POSTGRES_*`` variables, plus pool tuning."""

    # The descriptions are the documentation: README.md and
    # docs/postgres-exporter.md render their tables from them
    # (python -m tests.settings_docs).
    postgres_host: str = Field(min_length=1, description="server host")
    postgres_port: int = Field(default=5432, ge=1, le=65535, description="server port")
    postgres_db: str = Field(min_length=1, description="database")
    postgres_user: str = Field(min_length=1, description="user")
    postgres_password: SecretStr = Field(
        default=SecretStr(""), description="password; never shown in logs, messages or `repr`"
    )
    postgres_sslmode: SslMode = Field(
        default="require",
        description="`disable`, `allow`, `prefer`, `require`, `verify-ca` or `verify-full`; "
        "a mode the server cannot meet is a configuration error that says why",
    )
    postgres_table: SqlIdentifier = Field(
        default="gpu",
        description="readings table; a plain SQL identifier (anything else is refused at "
        "start-up), folded to lower case. gpuid's table of that name is taken over in place",
    )
    postgres_placements_table: SqlIdentifier = Field(
        default="placements",
        description="placements table; same rule, and must differ from `POSTGRES_TABLE`",
    )
    postgres_auto_migrate: bool = Field(
        default=True,
        description="create or migrate the tables at start-up, under an advisory lock; with "
        "`false` the tables must exist, or every call fails with `error_type=config`",
    )
    postgres_pool_max: int = Field(
        default=6, ge=1, le=100, description="connections in the pool (`psycopg_pool` max size)"
    )
    postgres_write_parallelism: int = Field(
        default=1,
        ge=1,
        le=16,
        description="transactions one batch is split into, on as many connections (at most "
        "`POSTGRES_POOL_MAX`); `1` writes each batch as one transaction",
    )
    postgres_batches_in_flight: int = Field(
        default=4,
        ge=1,
        le=16,
        description="batches written at once when several wait, committed in order (at most "
        "(`POSTGRES_POOL_MAX` - 1) / `POSTGRES_WRITE_PARALLELISM`, so one connection stays "
        "free for health checks); `1` sends one batch at a time",
    )
    postgres_connect_timeout: Duration = Field(
        default=10.0,
        gt=0,
        description="bound on connecting and on waiting for a pooled connection",
    )

    @field_validator("postgres_placements_table")
    @classmethod
    def _tables_differ(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("postgres_table"):
            raise ValueError("must differ from POSTGRES_TABLE")
        return value

    @property
    def write_parts(self) -> int:
        """How many transactions one batch may be split into: no more than the pool holds."""
        return min(self.postgres_write_parallelism, self.postgres_pool_max)

    @property
    def batches_in_flight(self) -> int:
        """How many batches may be written at once.

        As many as the pool has connections for, keeping one free for health
        checks while the writes in flight are held up.
        """
        room = (self.postgres_pool_max - 1) // self.write_parts
        return max(1, min(self.postgres_batches_in_flight, room))

    @property
    def target(self) -> str:
        """``host:port/db``, for messages (never the password)."""
        return f"{self.postgres_host}:{self.postgres_port}/{self.postgres_db}"

    def connection_kwargs(self) -> dict[str, Any]:
        """libpq connection parameters, passed as keywords rather than a DSN string."""
        kwargs: dict[str, Any] = {
            "host": self.postgres_host,
            "port": self.postgres_port,
            "dbname": self.postgres_db,
            "user": self.postgres_user,
            "sslmode": self.postgres_sslmode,
            # libpq takes whole seconds and treats anything under 2 as 2.
            "connect_timeout": max(2, math.ceil(self.postgres_connect_timeout)),
            "application_name": "gpufleet-inventory",
            # Notice a peer that vanished without a FIN (a dead node, a dropped
            # NAT entry) in about a minute, instead of hanging on it for hours.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
        password = self.postgres_password.get_secret_value()
        if password:
            kwargs["password"] = password
        return kwargs
