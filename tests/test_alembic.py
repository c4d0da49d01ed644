"""A real Alembic migration run by maintgate.alembic.upgrade inside a window, on SQLite and PostgreSQL."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest
from alembic.config import Config
from sqlalchemy import inspect, text

from maintgate import MaintenanceStore
from maintgate.alembic import upgrade
from tests.helpers import columns

ENV_PY = textwrap.dedent(
    """
    from alembic import context
    config = context.config

    def run_migrations_online():
        connection = config.attributes["connection"]
        context.configure(connection=connection, version_table=config.get_main_option("version_table"))
        with context.begin_transaction():
            context.run_migrations()

    run_migrations_online()
    """
)

RENAME = textwrap.dedent(
    """
    from alembic import op
    revision = "0001"
    down_revision = None

    def upgrade():
        with op.batch_alter_table("{table}") as batch:
            batch.alter_column("primary-email", new_column_name="main-email-contact")
    """
)

FAILING = textwrap.dedent(
    """
    from alembic import op
    revision = "0002"
    down_revision = "0001"

    def upgrade():
        op.add_column("{table}", __import__("sqlalchemy").Column("phone", __import__("sqlalchemy").Text()))
        raise RuntimeError("0002 found dirty data")
    """
)


@pytest.fixture
def project(store: MaintenanceStore, tmp_path: Path):
    """An Alembic script directory migrating a per-test contacts table; yields (config, table)."""
    table = f"contacts_{uuid.uuid4().hex[:8]}"
    version_table = f"alembic_version_{uuid.uuid4().hex[:8]}"
    with store.engine.begin() as conn:
        conn.execute(text(f'CREATE TABLE {table} (id INTEGER PRIMARY KEY, "primary-email" VARCHAR(200))'))
    root = tmp_path / "migrations"
    (root / "versions").mkdir(parents=True)
    (root / "env.py").write_text(ENV_PY)
    (root / "versions" / "0001_rename.py").write_text(RENAME.format(table=table))
    config = Config()
    config.set_main_option("script_location", str(root))
    config.set_main_option("version_table", version_table)
    yield config, table, root, version_table
    with store.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        conn.execute(text(f"DROP TABLE IF EXISTS {version_table}"))


def version(store, version_table):
    with store.engine.connect() as conn:
        if version_table not in inspect(conn).get_table_names():
            return None
        return conn.execute(text(f"SELECT version_num FROM {version_table}")).scalar()


def test_upgrade_commits_with_the_switch_off(store, project):
    config, table, _, version_table = project
    upgrade(store, "demo", config, message="alembic upgrade head")
    assert columns(store, table) == {"id", "main-email-contact"}
    assert version(store, version_table) == "0001"
    state = store.get("demo")
    assert not state.active and state.error is None
    assert [e.event for e in store.history("demo")] == ["window_opened", "window_committed"]
    assert store.history("demo")[0].message == "alembic upgrade head"
    assert "connection" not in config.attributes


def test_a_failing_migration_rolls_back_every_step_and_the_version(store, project):
    config, table, root, version_table = project
    (root / "versions" / "0002_phone.py").write_text(FAILING.format(table=table))
    with pytest.raises(RuntimeError, match="dirty data"):
        upgrade(store, "demo", config)
    assert columns(store, table) == {"id", "primary-email"}, "0001's rename rolled back too"
    assert version(store, version_table) is None
    state = store.get("demo")
    assert state.active and state.error == "RuntimeError: 0002 found dirty data"


def test_the_stock_env_py_is_refused_before_it_migrates_and_the_logger_stays_on(store, tmp_path):
    """``alembic init``'s env.py connects on its own: it would migrate outside the window."""
    import logging

    from alembic import command

    from maintgate import MaintgateError

    table = f"contacts_{uuid.uuid4().hex[:8]}"
    with store.engine.begin() as conn:
        conn.execute(text(f'CREATE TABLE {table} (id INTEGER PRIMARY KEY, "primary-email" VARCHAR(200))'))
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))  # the stock env.py's version table
    ini = tmp_path / "alembic.ini"
    config = Config(str(ini))
    command.init(config, str(tmp_path / "migrations"))  # writes the stock env.py and alembic.ini
    config = Config(str(ini))
    config.set_main_option("sqlalchemy.url", store.engine.url.render_as_string(hide_password=False))
    (tmp_path / "migrations" / "versions" / "0001_rename.py").write_text(RENAME.format(table=table))
    # fileConfig() below rewires logging for the whole process: put it back afterwards.
    loggers = {
        n: lg.disabled for n, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)
    }
    root_handlers, root_level = logging.root.handlers[:], logging.root.level
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("maintgate").addHandler(handler)
    try:
        with pytest.raises(MaintgateError, match=r"config\.attributes\.get\('connection'\)"):
            upgrade(store, "demo", config)
        assert columns(store, table) == {"id", "primary-email"}, "nothing migrated"
        assert "alembic_version" not in inspect(store.engine).get_table_names()
        state = store.get("demo")
        assert not state.active and state.window_id is None, "the window was withdrawn"
        assert [e.event for e in store.history("demo")] == ["window_opened", "window_withdrawn"]
        assert not logging.getLogger("maintgate").disabled, "fileConfig() must not silence maintgate"
        assert any(getattr(r, "maintgate_event", "") == "window_withdrawn" for r in seen)
    finally:
        logging.getLogger("maintgate").removeHandler(handler)
        for name, disabled in loggers.items():
            logging.getLogger(name).disabled = disabled
        logging.root.handlers[:] = root_handlers
        logging.root.setLevel(root_level)
        with store.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
