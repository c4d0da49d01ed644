"""The seed incident's model: a contact whose email column is renamed by a migration."""

from django.db import models


class Contact(models.Model):
    name = models.CharField(max_length=100)
    email = models.CharField(max_length=200, db_column="primary-email")

    class Meta:
        app_label = "djapp"
