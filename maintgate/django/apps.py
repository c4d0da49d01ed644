"""The Django app: add ``"maintgate.django"`` to ``INSTALLED_APPS``."""

from django.apps import AppConfig


class MaintgateConfig(AppConfig):
    """Registers maintgate's system checks and its ``maintgate`` management command."""

    name = "maintgate.django"
    label = "maintgate"
    verbose_name = "maintgate"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the checks)
