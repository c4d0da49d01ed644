"""The tables maintgate owns, on a MetaData of their own (the way Alembic keeps its version table)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import BigInteger, Boolean, Column, DateTime, Index, Integer, MetaData, String, Table, Text
from sqlalchemy.dialects import mysql

from .errors import InvalidArgument
from .state import TENANT_MAX_LENGTH

# Tenant ids compare exactly (MySQL's default collation would make "Demo" and "demo" one tenant),
# and times keep microseconds everywhere (MySQL's DATETIME drops them by default).
TenantId = String(TENANT_MAX_LENGTH).with_variant(
    mysql.VARCHAR(TENANT_MAX_LENGTH, collation="utf8mb4_bin"), "mysql", "mariadb"
)
Timestamp = DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

DEFAULT_PREFIX = "maintgate_"


@dataclass(frozen=True, slots=True)
class Tables:
    """The maintgate tables built for one table-name prefix and schema."""

    metadata: MetaData
    state: Table
    history: Table
    schedule: Table
    version: Table
    rollout: Table
    rollout_tenant: Table


def build_tables(prefix: str = DEFAULT_PREFIX, schema: str | None = None) -> Tables:
    """Build maintgate's tables on a fresh MetaData, named ``{prefix}state`` and so on."""
    if not isinstance(prefix, str) or not prefix or not prefix.replace("_", "a").isalnum():
        raise InvalidArgument(
            f"table_prefix must be letters, digits and underscores, got {prefix!r}", "table_prefix"
        )
    md = MetaData(schema=schema)
    state = Table(
        f"{prefix}state",
        md,
        Column("tenant", TenantId, primary_key=True),
        Column("active", Boolean, nullable=False, default=False),
        Column("message", Text),
        Column("error", Text),
        Column("retry_after", Integer),
        Column("ends_at", Timestamp),
        Column("started_at", Timestamp),
        Column("updated_at", Timestamp),
        Column("mode", String(16), nullable=False, default="full", server_default="full"),
        # Who switched it on: "operator" (activate, the CLI) or "window" (a migration window).
        Column("source", String(16)),
        # Who holds the tenant's migration window (NULL outside windows): host, pid, backend pid.
        Column("owner_host", String(255)),
        Column("owner_pid", Integer),
        Column("owner_backend_pid", Integer),
        # The open window's id (every write that ends it names it), its lease, and the mode it needs.
        Column("window_id", String(32)),
        Column("lease_until", Timestamp),
        Column("window_mode", String(16)),
        # The store-wide change number of the row's last change: gates read what changed since.
        Column("version", BigInteger),
        Index(f"ix_{prefix}state_version", "version"),
    )
    history = Table(
        f"{prefix}history",
        md,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("tenant", TenantId, nullable=False),
        Column("event", String(32), nullable=False),
        Column("at", Timestamp, nullable=False),
        Column("message", Text),
        Column("error", Text),
        Column("owner_host", String(255)),
        Column("owner_pid", Integer),
        Column("owner_backend_pid", Integer),
        Column("window_id", String(32)),
        Index(f"ix_{prefix}history_tenant_id", "tenant", "id"),
    )
    schedule = Table(
        f"{prefix}schedule",
        md,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("tenant", TenantId, nullable=False),
        Column("starts_at", Timestamp, nullable=False),
        Column("ends_at", Timestamp),
        Column("message", Text),
        Column("mode", String(16), nullable=False, default="full", server_default="full"),
        Column("retry_after", Integer),
        Column("created_at", Timestamp, nullable=False),
        Index(f"ix_{prefix}schedule_tenant_ends", "tenant", "ends_at"),
    )
    # One row: the store's change counter. Every change takes its row lock until it commits, so
    # change numbers become visible in order and "what changed since N" misses nothing.
    version = Table(
        f"{prefix}version",
        md,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("version", BigInteger, nullable=False),
    )
    # A fleet rollout's plan: the rollout itself, and one row per tenant (see maintgate.fleet).
    rollout = Table(
        f"{prefix}rollout",
        md,
        Column("name", String(128), primary_key=True),
        Column("created_at", Timestamp, nullable=False),
        Column("canary", Integer, nullable=False, default=0),
        Column("max_failures", Integer),
        Column("stop_reason", Text),
        # SQLite runs one runner at a time: the one that holds this lease.
        Column("runner", String(128)),
        Column("runner_lease_until", Timestamp),
    )
    rollout_tenant = Table(
        f"{prefix}rollout_tenant",
        md,
        Column("name", String(128), primary_key=True),
        Column("tenant", TenantId, primary_key=True),
        Column("position", Integer, nullable=False),
        Column("status", String(16), nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("runner", String(128)),
        Column("lease_until", Timestamp),
        Column("started_at", Timestamp),
        Column("finished_at", Timestamp),
        Column("error", Text),
        Index(f"ix_{prefix}rollout_tenant_next", "name", "status", "position"),
    )
    return Tables(md, state, history, schedule, version, rollout, rollout_tenant)


_DEFAULT = build_tables()
metadata: MetaData = _DEFAULT.metadata
"""maintgate's tables with the default prefix: pass it to Alembic's ``target_metadata``."""
