"""The tables maintgate owns, on a MetaData of their own (the way Alembic keeps its version table)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Boolean, Column, DateTime, Integer, MetaData, String, Table, Text

from .state import TENANT_MAX_LENGTH

DEFAULT_PREFIX = "maintgate_"


@dataclass(frozen=True, slots=True)
class Tables:
    """The maintgate tables built for one table-name prefix and schema."""

    metadata: MetaData
    state: Table


def build_tables(prefix: str = DEFAULT_PREFIX, schema: str | None = None) -> Tables:
    """Build maintgate's tables on a fresh MetaData, named ``{prefix}state`` and so on."""
    if not prefix or not prefix.replace("_", "a").isalnum():
        raise ValueError(f"table_prefix must be letters, digits and underscores, got {prefix!r}")
    md = MetaData(schema=schema)
    state = Table(
        f"{prefix}state",
        md,
        Column("tenant", String(TENANT_MAX_LENGTH), primary_key=True),
        Column("active", Boolean, nullable=False, default=False),
        Column("message", Text),
        Column("error", Text),
        Column("retry_after", Integer),
        Column("ends_at", DateTime(timezone=True)),
        Column("started_at", DateTime(timezone=True)),
        Column("updated_at", DateTime(timezone=True)),
    )
    return Tables(md, state)


_DEFAULT = build_tables()
metadata: MetaData = _DEFAULT.metadata
"""maintgate's tables with the default prefix: pass it to Alembic's ``target_metadata``."""
