import os

from django.db import migrations


def backfill(apps, schema_editor):
    Widget = apps.get_model("djmig", "Widget")
    Widget.objects.using(schema_editor.connection.alias).create(name="first", size=1)
    fail = os.environ.get("MAINTGATE_TEST_FAIL_0003")
    if fail:
        detail = "\nDETAIL:  Key (email)=(ceo@example.com) already exists.\x1b[2J" if fail == "detail" else ""
        raise RuntimeError("0003 refused: dirty data" + detail)


class Migration(migrations.Migration):
    dependencies = [("djmig", "0002_size")]
    operations = [migrations.RunPython(backfill, migrations.RunPython.noop)]
