"""``manage.py maintgate on|off|status|history|release|…``: the ``maintgate`` CLI on Django's database.

``manage.py maintgate migrate (TENANT | --all) [migrate's arguments]`` runs Django's ``migrate``
inside a migration window: every migration, its ``django_migrations`` row and the switch-off
commit together, or none of them and maintenance stays on with the error recorded.
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from maintgate import cli
from maintgate.core.errors import MaintgateError
from maintgate.core.state import ALL_TENANTS
from maintgate.django import conf


def _cli_prefix() -> list[str]:
    from maintgate.django import database_url

    url = conf.get("DATABASE_URL") or database_url(conf.database_alias()).render_as_string(
        hide_password=False
    )
    prefix = ["--database-url", url, "--table-prefix", conf.get("TABLE_PREFIX", "maintgate_")]
    schema = conf.get("SCHEMA")
    return prefix + (["--schema", schema] if schema else [])


MIGRATE_USAGE = "usage: manage.py maintgate migrate (TENANT | --all) [migrate's arguments]"


class Command(BaseCommand):
    help = (
        "Switch tenants in and out of maintenance, and see what is going on (same as the maintgate CLI); "
        "`maintgate migrate (TENANT | --all) [migrate's arguments]` runs migrate inside a window."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "args", nargs=argparse.REMAINDER, help="a maintgate CLI command, e.g. status --json"
        )

    def run_from_argv(self, argv: list[str]) -> None:
        """Hand everything after ``manage.py maintgate`` to the CLI's own parser (its --help too)."""
        from django.conf import settings

        if argv[2:3] == ["migrate"]:
            super().run_from_argv(argv)
            return
        settings.INSTALLED_APPS  # noqa: B018  (configure settings before reading them)
        sys.exit(cli.main([*_cli_prefix(), *argv[2:]]))

    def handle(self, *args: Any, **options: Any) -> str:
        if args[:1] == ("migrate",):
            self.migrate(list(args[1:]))
            return ""
        out, err = io.StringIO(), io.StringIO()
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            code = cli.main([*_cli_prefix(), *args])
        except SystemExit as exc:  # argparse errors
            code = exc.code if isinstance(exc.code, int) else 2
        finally:
            sys.stdout, sys.stderr = stdout, stderr
        if code:
            raise CommandError(err.getvalue().strip() or f"maintgate exited with {code}")
        return out.getvalue().rstrip("\n")

    def migrate(self, args: list[str]) -> None:
        """Run Django's ``migrate`` with ``args`` inside a window for one tenant, or all (``--all``)."""
        from django.core.management import call_command

        from maintgate.django import maintenance_window

        if not args or (args[0].startswith("-") and args[0] != "--all"):
            raise CommandError(MIGRATE_USAGE)
        tenant, rest = (ALL_TENANTS if args[0] == "--all" else args[0]), args[1:]
        using = _database_option(rest)
        if using is None:
            using = conf.database_alias()
            rest = [*rest, "--database", using]
        shown = "every tenant" if tenant == ALL_TENANTS else f"tenant {tenant!r}"
        try:
            with maintenance_window(tenant, using=using, message="Upgrading the database"):
                call_command("migrate", *rest, stdout=self.stdout, stderr=self.stderr)
        except (MaintgateError, CommandError) as exc:
            raise CommandError(f"maintgate migrate for {shown}: {exc}") from exc
        except Exception as exc:
            raise CommandError(
                f"migrate failed inside the window for {shown} and rolled back, with its "
                f"django_migrations rows; maintenance stays on with the error recorded "
                f"(manage.py maintgate status): {type(exc).__name__}: {exc}"
            ) from exc
        self.stdout.write(f"maintgate: migrated {shown} inside its window, which is now closed")


def _database_option(args: list[str]) -> str | None:
    """The alias ``--database`` names among migrate's arguments, if any."""
    for i, arg in enumerate(args):
        if arg == "--database" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--database="):
            return arg.split("=", 1)[1]
    return None
