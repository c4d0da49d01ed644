import os

from django.db import migrations


def backfill(apps, schema_editor):
    Widget = apps.get_model("djmig", "Widget")
    Widget.objects.using(schema_editor.connection.alias).create(name="first", size=1)
    if os.environ.get("MAINTGATE_TEST_FAIL_0003"):
        raise RuntimeError("0003 refused: dirty data")


class Migration(migrations.Migration):
    dependencies = [("djmig", "0002_size")]
    operations = [migrations.RunPython(backfill, migrations.RunPython.noop)]
