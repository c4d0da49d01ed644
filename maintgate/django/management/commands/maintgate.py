"""``manage.py maintgate on|off|status|history|…``: the ``maintgate`` CLI on Django's database."""

from __future__ import annotations

import argparse
import io
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from maintgate import cli
from maintgate.django import conf


def _cli_prefix() -> list[str]:
    from maintgate.django import database_url

    url = conf.get("DATABASE_URL") or database_url(conf.database_alias()).render_as_string(
        hide_password=False
    )
    prefix = ["--database-url", url, "--table-prefix", conf.get("TABLE_PREFIX", "maintgate_")]
    schema = conf.get("SCHEMA")
    return prefix + (["--schema", schema] if schema else [])


class Command(BaseCommand):
    help = "Switch tenants in and out of maintenance, and see what is going on (same as the maintgate CLI)."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "args", nargs=argparse.REMAINDER, help="a maintgate CLI command, e.g. status --json"
        )

    def run_from_argv(self, argv: list[str]) -> None:
        """Hand everything after ``manage.py maintgate`` to the CLI's own parser (its --help too)."""
        from django.conf import settings

        settings.INSTALLED_APPS  # noqa: B018  (configure settings before reading them)
        sys.exit(cli.main([*_cli_prefix(), *argv[2:]]))

    def handle(self, *args: Any, **options: Any) -> str:
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
