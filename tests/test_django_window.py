"""maintgate.django.maintenance_window in a real Django project, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from tests.conftest import require_postgres
from tests.django_setup import setup

setup()

from django.db import connections, models  # noqa: E402

from maintgate.django import get_store, maintenance_window  # noqa: E402
from maintgate.fleet import rollout_status as fleet_status  # noqa: E402
from tests.djapp.models import Contact  # noqa: E402


@pytest.fixture(params=["default", "pg"])
def using(request) -> Iterator[str]:
    """A Django database alias with the contacts table and maintgate's tables, cleaned afterwards."""
    alias = request.param
    if alias == "pg":
        require_postgres()
    from django.test import override_settings

    settings = override_settings(MAINTGATE={"DATABASE": alias})  # the gate reads where the window writes
    settings.enable()
    request.addfinalizer(settings.disable)
    connection = connections[alias]
    store = get_store(alias)
    store.drop_tables()
    store.create_tables()
    with connection.cursor() as cursor:
        cursor.execute('DROP TABLE IF EXISTS "djapp_contact"')
    with connection.schema_editor() as editor:
        editor.create_model(Contact)
    Contact.objects.using(alias).create(name="Ada", email="ada@example.com")
    yield alias
    with connection.schema_editor() as editor:
        editor.delete_model(Contact)
    store.drop_tables()


def renamed_field() -> tuple[models.Field, models.Field]:
    old = Contact._meta.get_field("email")
    new = models.CharField(max_length=200, db_column="main-email-contact")
    new.set_attributes_from_name("email")
    new.model = Contact
    return old, new


def contact_columns(alias: str) -> set[str]:
    connection = connections[alias]
    with connection.cursor() as cursor:
        return {c.name for c in connection.introspection.get_table_description(cursor, "djapp_contact")}


def test_schema_editor_and_orm_commit_with_the_switch_off(using):
    store = get_store(using)
    with maintenance_window("demo", using=using, message="Renaming primary-email") as connection:
        state = store.get("demo")
        assert state.active and store.window_alive(state) is True
        old, new = renamed_field()
        with connection.schema_editor() as editor:
            editor.alter_field(Contact, old, new)
        with connection.cursor() as cursor:
            cursor.execute(
                'INSERT INTO djapp_contact (name, "main-email-contact") VALUES (%s, %s)', ["Grace", "g@x"]
            )
    assert contact_columns(using) == {"id", "name", "main-email-contact"}
    state = store.get("demo")
    assert not state.active and state.owner is None and state.error is None
    assert [e.event for e in store.history("demo")] == ["window_opened", "window_committed"]


def test_failure_rolls_back_schema_and_orm_work_and_records_the_error(using):
    store = get_store(using)
    with (
        pytest.raises(RuntimeError, match="task failed"),
        maintenance_window("demo", using=using) as connection,
    ):
        Contact.objects.using(using).create(name="Grace", email="grace@example.com")
        old, new = renamed_field()
        with connection.schema_editor() as editor:
            editor.alter_field(Contact, old, new)
        raise RuntimeError("task failed after the rename")
    assert contact_columns(using) == {"id", "name", "primary-email"}
    assert Contact.objects.using(using).count() == 1
    state = store.get("demo")
    assert state.active and state.error == "RuntimeError: task failed after the rename"


def test_failure_in_the_switch_off_rolls_back_the_django_work(using):
    store = get_store(using)
    table = store.tables.state.name
    with connections[using].cursor() as cursor:
        if connections[using].vendor == "sqlite":
            cursor.execute(
                f"CREATE TRIGGER {table}_no_off BEFORE UPDATE ON {table} "
                "WHEN OLD.active = 1 AND NEW.active = 0 BEGIN SELECT RAISE(ABORT, 'switch-off rejected'); END"
            )
        else:
            cursor.execute(
                f"CREATE FUNCTION {table}_no_off() RETURNS trigger AS $$ BEGIN "
                "IF OLD.active AND NOT NEW.active THEN RAISE EXCEPTION 'switch-off rejected'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            cursor.execute(
                f"CREATE TRIGGER {table}_no_off BEFORE UPDATE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {table}_no_off()"
            )
    try:
        with pytest.raises(Exception, match="switch-off rejected"), maintenance_window("demo", using=using):
            Contact.objects.using(using).create(name="Grace", email="grace@example.com")
        assert Contact.objects.using(using).count() == 1
        state = store.get("demo")
        assert state.active and "switch-off rejected" in state.error
    finally:
        with connections[using].cursor() as cursor:
            cursor.execute(
                f"DROP TRIGGER IF EXISTS {table}_no_off"
                + ("" if connections[using].vendor == "sqlite" else f" ON {table}")
            )
            if connections[using].vendor != "sqlite":
                cursor.execute(f"DROP FUNCTION IF EXISTS {table}_no_off()")


def test_refused_inside_an_atomic_block(using):
    from django.db import transaction

    from maintgate import MaintgateError

    with (
        transaction.atomic(using=using),
        pytest.raises(MaintgateError, match=r"outside transaction\.atomic"),
        maintenance_window("demo", using=using),
    ):
        pass
    assert get_store(using).get("demo") is None


def test_work_that_commits_djangos_transaction_itself_fails_the_window(using):
    from maintgate import WindowLost

    store = get_store(using)
    with pytest.raises(WindowLost), maintenance_window("demo", using=using) as connection:
        Contact.objects.using(using).create(name="Grace", email="grace@example.com")
        with connection.cursor() as cursor:
            cursor.execute("COMMIT")  # behind Django's back: the window must notice
    state = store.get("demo")
    assert state.active and "WindowLost" in state.error and state.window_id is None


def test_a_window_marked_for_rollback_is_recorded(store):
    from django.db import transaction
    from django.test import override_settings

    alias = "pg" if store.engine.dialect.name != "sqlite" else "default"
    prefix = store.tables.state.name.removesuffix("state")
    with override_settings(MAINTGATE={"DATABASE": alias, "TABLE_PREFIX": prefix}):
        django_store = get_store(alias)  # the store on Django's own database, where the window must be
        django_store.create_tables()
        try:
            with (
                pytest.raises(Exception, match="marked for rollback"),
                maintenance_window("demo", using=alias),
            ):
                transaction.set_rollback(True, using=alias)
            state = django_store.get("demo")
            assert state.active and "marked for rollback" in state.error
        finally:
            django_store.drop_tables()
            django_store.engine.dispose()


def test_a_window_is_refused_when_maintgates_tables_are_elsewhere(tmp_path):
    from django.test import override_settings

    from maintgate import MaintgateError

    default = get_store("default")
    default.create_tables()
    try:
        with (
            override_settings(MAINTGATE={"DATABASE": "pg"}),
            pytest.raises(MaintgateError, match=r"DATABASES\['default'\].*MAINTGATE\['DATABASE'\] = 'pg'"),
            maintenance_window("demo", using="default"),
        ):
            pytest.fail("the body must not run")
        other = tmp_path / "other.db"
        with (
            override_settings(MAINTGATE={"DATABASE_URL": f"sqlite:///{other}"}),
            pytest.raises(MaintgateError, match=r"MAINTGATE\['DATABASE_URL'\].*DATABASES\['default'\]"),
            maintenance_window("demo"),
        ):
            pytest.fail("the body must not run")
        assert default.get("demo") is None and not other.exists(), "nothing changed anywhere"
    finally:
        default.drop_tables()


@pytest.fixture(params=["default", "pg"])
def migrating(request, monkeypatch) -> Iterator[str]:
    """A database alias with maintgate's tables and none of the djmig app's migrations applied."""
    from django.test import override_settings

    alias = request.param
    if alias == "pg":
        require_postgres()
    settings = override_settings(MAINTGATE={"DATABASE": alias})
    settings.enable()
    store = get_store(alias)
    store.drop_tables()
    store.create_tables()

    def unmigrate() -> None:
        with connections[alias].cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS djmig_widget")
            if "django_migrations" in connections[alias].introspection.table_names(cursor):
                cursor.execute("DELETE FROM django_migrations WHERE app = 'djmig'")

    unmigrate()
    yield alias
    unmigrate()
    store.drop_tables()
    settings.disable()


def djmig_state(alias: str) -> tuple[set[str], list[str]]:
    """The djmig table's columns (empty if absent) and the djmig migrations Django recorded."""
    connection = connections[alias]
    with connection.cursor() as cursor:
        tables = connection.introspection.table_names(cursor)
        cols = (
            {c.name for c in connection.introspection.get_table_description(cursor, "djmig_widget")}
            if "djmig_widget" in tables
            else set()
        )
        applied = []
        if "django_migrations" in tables:
            cursor.execute("SELECT name FROM django_migrations WHERE app = 'djmig' ORDER BY name")
            applied = [row[0] for row in cursor.fetchall()]
    return cols, applied


def test_manage_py_maintgate_migrate_runs_djangos_migrations_inside_the_window(migrating, monkeypatch):
    from django.core.management import CommandError, call_command

    store = get_store(migrating)
    monkeypatch.setenv("MAINTGATE_TEST_FAIL_0003", "1")
    with pytest.raises(CommandError, match="0003 refused: dirty data"):
        call_command("maintgate", "migrate", "demo", "djmig", verbosity=0)
    assert djmig_state(migrating) == (set(), []), "0001 and 0002 rolled back with their records"
    state = store.get("demo")
    assert state.active and "0003 refused" in state.error and state.window_id is None
    monkeypatch.delenv("MAINTGATE_TEST_FAIL_0003")
    call_command("maintgate", "migrate", "demo", "djmig", verbosity=0)
    assert djmig_state(migrating) == (
        {"id", "name", "size"},
        ["0001_initial", "0002_size", "0003_backfill"],
    )
    assert not store.get("demo").active
    call_command("maintgate", "migrate", "--all", "djmig", "zero", verbosity=0)
    assert djmig_state(migrating) == (set(), [])
    assert [e.event for e in store.history("*")] == ["window_opened", "window_committed"]


def test_manage_py_maintgate_release_clears_a_dead_window(using):

    from maintgate import Owner

    store = get_store(using)
    dead = store.open_window("demo", Owner("crashed-host", 7), lease=600)
    from tests.django_setup import manage

    assert f"window {dead.id}" in manage("status", "demo")
    assert f"released window {dead.id}" in manage("release", "demo")
    with maintenance_window("demo", using=using):
        pass
    assert not store.get("demo").active


@pytest.fixture
def isolated(request, using) -> Iterator[str]:
    """``using``, reconnected with a stricter transaction setting: REPEATABLE READ, or SQLite IMMEDIATE."""
    connection = connections[using]
    connection.close()
    options = connection.settings_dict.setdefault("OPTIONS", {})
    saved = dict(options)
    if connection.vendor == "postgresql":
        from psycopg import IsolationLevel

        options["isolation_level"] = IsolationLevel.REPEATABLE_READ
    else:
        options["transaction_mode"] = "IMMEDIATE"  # Django 5.1+: the write lock at BEGIN
    yield using
    connection.close()
    options.clear()
    options.update(saved)


def test_a_window_under_repeatable_read_or_sqlite_immediate_commits_with_its_switch_off(isolated):
    store = get_store(isolated)
    old, new = renamed_field()
    with maintenance_window("demo", using=isolated) as connection, connection.schema_editor() as editor:
        editor.alter_field(Contact, old, new)
    assert contact_columns(isolated) == {"id", "name", "main-email-contact"}
    state = store.get("demo")
    assert not state.active and state.window_id is None


def test_manage_py_maintgate_migrate_checks_its_arguments_before_the_window_opens(migrating):
    from django.core.management import CommandError, call_command

    store = get_store(migrating)
    for args in (["--databse", migrating], ["no_such_app"], ["djmig", "9999"], ["--database"]):
        with pytest.raises(CommandError) as refused:
            call_command("maintgate", "migrate", "demo", *args, verbosity=0)
        assert "window" not in str(refused.value) or "not opened" in str(refused.value), refused.value
        state = store.get("demo")
        assert state is None or not state.active, f"{args}: nothing was attempted, so no maintenance"
    assert store.history("demo") == []


def test_manage_py_maintgate_migrate_failure_is_one_line_and_says_maintenance_stays_on(
    migrating, monkeypatch
):
    from django.core.management import CommandError, call_command

    monkeypatch.setenv("MAINTGATE_TEST_FAIL_0003", "detail")
    with pytest.raises(CommandError) as failed:
        call_command("maintgate", "migrate", "demo", "djmig", verbosity=0)
    message = str(failed.value)
    assert "\n" not in message and "\x1b" not in message and "DETAIL" not in message, message
    assert "0003 refused: dirty data" in message and "maintenance stays on" in message, message
    assert "DETAIL" in get_store(migrating).get("demo").error, "the operator's record keeps it"


@pytest.fixture
def schemas(request) -> Iterator[tuple[list[str], object]]:
    """Three tenants with a PostgreSQL schema each, and a store of their own on Django's ``pg``."""
    import uuid

    from django.test import override_settings

    require_postgres()
    tag = uuid.uuid4().hex[:6]
    settings = override_settings(MAINTGATE={"DATABASE": "pg", "TABLE_PREFIX": f"mg{tag}_"})
    settings.enable()
    store = get_store("pg")
    store.create_tables()
    tenants = [f"s{tag}{i}" for i in range(3)]
    with connections["pg"].cursor() as cursor:
        for tenant in tenants:
            cursor.execute(f'CREATE SCHEMA "{tenant}"')
    yield tenants, store
    with connections["pg"].cursor() as cursor:
        for tenant in tenants:
            cursor.execute(f'DROP SCHEMA IF EXISTS "{tenant}" CASCADE')
    store.drop_tables()
    settings.disable()


def schema_state(schema: str) -> tuple[set[str], list[str]]:
    """The djmig table's columns in ``schema`` and the djmig migrations recorded there."""
    with connections["pg"].cursor() as cursor:
        cursor.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s"
            " AND table_name = 'djmig_widget'",
            [schema],
        )
        cols = {row[0] for row in cursor.fetchall()}
        cursor.execute("SELECT to_regclass(%s)", [f'"{schema}".django_migrations'])
        applied: list[str] = []
        if cursor.fetchone()[0] is not None:
            recorded = f'"{schema}".django_migrations'
            cursor.execute(f"SELECT name FROM {recorded} WHERE app = 'djmig' ORDER BY name")
            applied = [row[0] for row in cursor.fetchall()]
    return cols, applied


def test_manage_py_maintgate_rollout_call_migrate_migrates_each_tenants_schema(
    schemas, tmp_path, monkeypatch
):
    from django.core.management import CommandError, call_command

    tenants, store = schemas
    listing = tmp_path / "tenants.txt"
    listing.write_text("\n".join([*tenants, "nosuchschema"]))
    run = ["rollout", "run", "schemas", "--tenants", str(listing), "--call", "migrate"]
    out = io.StringIO()
    monkeypatch.setenv("MAINTGATE_TEST_FAIL_0003", "1")
    with pytest.raises(CommandError, match="not complete"):
        call_command("maintgate", *run, "--concurrency", "4", stdout=out)
    assert "migrate runs 1 window(s) at a time" in out.getvalue(), out.getvalue()
    first = tenants[0]
    assert schema_state(first) == (set(), []), "0001-0003 rolled back with their records"
    assert store.get(first).active and "0003 refused" in store.get(first).error
    assert all(store.get(t) is None for t in tenants[1:]), "the first failure stopped the rollout"

    monkeypatch.delenv("MAINTGATE_TEST_FAIL_0003")
    out = io.StringIO()
    with pytest.raises(CommandError, match="not complete"):
        call_command("maintgate", *run, "--retry-failed", "--max-failures", "1", stdout=out)
    assert "3 migrated now, 0 done before, 1 failed" in out.getvalue(), out.getvalue()
    assert "has no schema 'nosuchschema'" in out.getvalue()
    for tenant in tenants:
        assert schema_state(tenant) == (
            {"id", "name", "size"},
            ["0001_initial", "0002_size", "0003_backfill"],
        ), tenant
        assert not store.get(tenant).active
    assert store.get("nosuchschema").active, "the tenant without a schema stays in maintenance"
    public = connections["pg"]
    with public.cursor() as cursor:
        cursor.execute("SELECT to_regclass('public.djmig_widget')")
        assert cursor.fetchone()[0] is None, "nothing was migrated in the public schema"


def test_manage_py_maintgate_rollout_call_migrate_is_refused_off_postgresql(tmp_path):
    from django.core.management import CommandError, call_command
    from django.test import override_settings

    listing = tmp_path / "tenants.txt"
    listing.write_text("demo\n")
    with override_settings(MAINTGATE={"DATABASE": "default", "TABLE_PREFIX": "mgsqliteroll_"}):
        store = get_store("default")
        store.create_tables()
        try:
            with pytest.raises(CommandError, match=r"runs each tenant's migrations in its own PostgreSQL"):
                call_command("maintgate", "rollout", "run", "r", "--tenants", listing, "--call", "migrate")
            assert store.get("demo") is None and fleet_status(store, "r") is None, "nothing changed"
        finally:
            store.drop_tables()
