from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("djmig", "0001_initial")]
    operations = [migrations.AddField("widget", "size", models.IntegerField(default=0))]
