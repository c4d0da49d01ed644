"""``manage.py maintgate on|off|status|history|release|…``: the ``maintgate`` CLI's commands on
Django's own store (the one the middleware reads), writing to the command's ``stdout``.

``manage.py maintgate migrate (TENANT | --all) [migrate's arguments]`` runs Django's ``migrate``
inside a migration window: every migration, its ``django_migrations`` row and the switch-off
commit together, or none of them and maintenance stays on with the error recorded.
"""

from __future__ import annotations

import argparse
import io
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from maintgate import cli
from maintgate.core.state import ALL_TENANTS
from maintgate.django import conf
from maintgate.django.fleet import MIGRATE
from maintgate.report import printable

BUILTINS = {"migrate": MIGRATE}

MIGRATE_USAGE = "usage: manage.py maintgate migrate (TENANT | --all) [migrate's arguments]"
MIGRATE_HELP = (
    "Runs Django's migrate inside a migration window for TENANT (--all: the global switch): "
    "every migration, its django_migrations row and the switch-off commit together, or none "
    "of them, and maintenance stays on with the error recorded."
)


class Command(BaseCommand):
    help = (
        "Switch tenants in and out of maintenance on the store the middleware reads, and see what "
        "is going on; `migrate (TENANT | --all) [migrate's arguments]` runs migrate inside a window."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        cli.add_commands(sub, BUILTINS)
        # Everything after `migrate` is ours to read, options included: `--all --database pg`.
        migrate = sub.add_parser(
            "migrate",
            help="run Django's migrate inside a migration window for a tenant (or --all)",
            usage=MIGRATE_USAGE.removeprefix("usage: "),
            prefix_chars="+",
            add_help=False,
        )
        migrate.add_argument("arguments", nargs=argparse.REMAINDER)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["command"] == "migrate":
            self.migrate(list(options["arguments"]))
            return
        from maintgate.django import get_store

        store = get_store(conf.database_alias())
        try:
            cli.execute(argparse.Namespace(**options), store, self.stdout, BUILTINS)
        except Exception as exc:
            line = cli.failure(exc, store.engine.url.render_as_string(hide_password=True))
            if line is None:
                raise
            raise CommandError(line) from exc

    def migrate(self, args: list[str]) -> None:
        """Run Django's ``migrate`` with ``args`` inside a window for one tenant, or all (``--all``)."""
        from django.core.management import call_command

        from maintgate.django import maintenance_window

        if args[:1] in (["-h"], ["--help"]):
            self.stdout.write(f"{MIGRATE_USAGE}\n\n{MIGRATE_HELP}")
            return
        if not args or (args[0].startswith("-") and args[0] != "--all"):
            raise CommandError(MIGRATE_USAGE)
        tenant, rest = (ALL_TENANTS if args[0] == "--all" else args[0]), args[1:]
        using = _database_option(rest)
        if using is None:
            using = conf.database_alias()
            rest = [*rest, "--database", using]
        shown = "every tenant" if tenant == ALL_TENANTS else f"tenant {tenant!r}"
        # A dry run first: a mistyped argument, app label or migration name is refused before
        # the window opens, so it never leaves the tenant in maintenance.
        dry = [a for a in rest if a not in ("--check", "--plan")]
        try:
            call_command("migrate", *dry, plan=True, stdout=io.StringIO(), stderr=io.StringIO())
        except CommandError as exc:
            raise CommandError(f"maintgate migrate for {shown}: {_first_line(exc)}; nothing changed") from exc
        entered = False
        try:
            with maintenance_window(tenant, using=using, message="Upgrading the database"):
                entered = True
                call_command("migrate", *rest, stdout=self.stdout, stderr=self.stderr)
        except Exception as exc:
            if not entered:
                raise CommandError(
                    f"maintgate migrate for {shown}: the window did not open, nothing changed: "
                    f"{_first_line(exc)}"
                ) from exc
            raise CommandError(
                f"migrate failed inside the window for {shown} and rolled back, with its "
                f"django_migrations rows; maintenance stays on with the error recorded "
                f"(manage.py maintgate status): {type(exc).__name__}: {_first_line(exc)}"
            ) from exc
        self.stdout.write(f"maintgate: migrated {shown} inside its window, which is now closed")


def _first_line(exc: BaseException) -> str:
    """The first line of an error, escaped: a database's DETAIL lines carry row data."""
    text = str(exc).strip()
    return printable(text.splitlines()[0] if text else type(exc).__name__)


def _database_option(args: list[str]) -> str | None:
    """The alias ``--database`` names among migrate's arguments, if any."""
    for i, arg in enumerate(args):
        if arg == "--database" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--database="):
            return arg.split("=", 1)[1]
    return None
