from django.apps import AppConfig


class ExampleConfig(AppConfig):
    name = "exampleproject"

    def ready(self) -> None:
        # One command to run the example: create maintgate's tables if they are missing.
        from maintgate.django import get_store

        get_store().create_tables()
