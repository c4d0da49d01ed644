"""A Django app with real migrations, for ``manage.py maintgate migrate`` (the third can be made to fail)."""
