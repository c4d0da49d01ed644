"""maintgate.django.maintenance_window in a real Django project, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from maintgate import owner_alive
from tests.conftest import require_postgres
from tests.django_setup import setup

setup()

from django.db import connections, models  # noqa: E402

from maintgate.django import get_store, maintenance_window  # noqa: E402
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
        assert state.active and owner_alive(store, state) is True
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
