"""The ``maintgate`` command: switch tenants in and out of maintenance, and see what is going on."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import make_url
from sqlalchemy.exc import SQLAlchemyError

from . import __version__, report
from .core.errors import MaintgateError, explain
from .core.state import ALL_TENANTS, FULL, MODES, utcnow
from .core.store import MaintenanceStore
from .report import Terminal, printable

DEFAULT_URL = "sqlite:///maintgate.db"
DESCRIPTION = "Switch tenants in and out of maintenance, and see what is going on."


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maintgate", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"maintgate {__version__}")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("MAINTGATE_DATABASE_URL", DEFAULT_URL),
        help="SQLAlchemy URL (default: $MAINTGATE_DATABASE_URL or %(default)s)",
    )
    parser.add_argument("--table-prefix", default="maintgate_", help="prefix of maintgate's tables")
    parser.add_argument("--schema", default=None, help="schema of maintgate's tables")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub)
    sub.add_parser("demo", help="replay the seed incident end to end on SQLite, with a real server")
    return parser


@dataclass(frozen=True, slots=True)
class BuiltinMigration:
    """A migration ``rollout run --call NAME`` names without a module (Django's ``migrate``)."""

    migrate: Callable[[Any, str], Any]
    opener: Callable[..., Any]
    help: str
    concurrency: int | None = None
    """Windows at once this migration allows in one process (None: as asked)."""
    check: Callable[[], None] | None = None
    """Raises if the migration cannot run here, before anything changes."""


def add_commands(sub: Any, builtins: Mapping[str, BuiltinMigration] | None = None) -> None:
    """The commands that act on a store, added to ``sub`` (the CLI's subparsers, or Django's);
    ``builtins``: migrations ``rollout run --call`` takes by name."""
    sub.add_parser("init", help="create maintgate's tables (idempotent)")

    status = sub.add_parser("status", help="show what the gate answers each tenant now, and why")
    status.add_argument("tenant", nargs="?", help="one tenant (default: every recorded one)")
    status.add_argument("--json", action="store_true", help="print a JSON array")

    on = sub.add_parser("on", help="switch maintenance on, now or on a schedule")
    _target(on)
    on.add_argument("--message", help="shown to clients")
    on.add_argument("--retry-after", type=_seconds, metavar="SECONDS", help="Retry-After for clients")
    on.add_argument(
        "--mode", choices=MODES, default=FULL, help="read_only lets reads through (default %(default)s)"
    )
    on.add_argument(
        "--at",
        type=_when,
        metavar="TIME",
        help="start then instead of now: ISO 8601 (UTC if no offset) or +30m",
    )
    on.add_argument("--until", type=_until, metavar="TIME", help="end by itself then: ISO 8601 or +2h")

    unschedule = sub.add_parser("unschedule", help="cancel a planned window (ids are in status)")
    unschedule.add_argument("id", type=int, help="the schedule id")

    off = sub.add_parser("off", help="switch maintenance off, and say what that ended")
    _target(off)

    release = sub.add_parser(
        "release", help="clear the window that holds a tenant (its process is gone); maintenance stays on"
    )
    release.add_argument("tenant", help="the tenant")

    fleet = sub.add_parser("rollout", help="one migration across many tenants, each in its own window")
    steps = fleet.add_subparsers(dest="rollout_command", required=True, metavar="STEP")
    run = steps.add_parser("run", help="run (or resume) a rollout: claims tenants until none is left")
    run.add_argument("name", help="the rollout's name: running it again resumes it")
    run.add_argument("--tenants", required=True, metavar="FILE", help="one tenant per line ('-': stdin)")
    named = "".join(f"; or {name}: {b.help}" for name, b in (builtins or {}).items())
    run.add_argument(
        "--call",
        required=True,
        metavar="MODULE:FUNCTION",
        help=f"the migration: function(connection, tenant){named}",
    )
    run.add_argument("--concurrency", type=_positive, default=4, help="windows at once (default %(default)s)")
    run.add_argument("--canary", type=_count, default=0, help="run the first N first; any failure stops")
    run.add_argument(
        "--max-failures",
        type=_count,
        default=0,
        metavar="K",
        help="stop claiming once K failed (0: the first)",
    )
    run.add_argument("--message", help="shown to clients of a tenant in its window")
    run.add_argument("--retry-after", type=_seconds, metavar="SECONDS", help="Retry-After for them")
    run.add_argument("--retry-failed", action="store_true", help="retry the tenants that failed before")
    status_step = steps.add_parser("status", help="counts, and each failed tenant's error")
    status_step.add_argument("name", help="the rollout")
    status_step.add_argument("--json", action="store_true", help="print JSON")
    stop_step = steps.add_parser("stop", help="stop claiming new tenants (open windows finish)")
    stop_step.add_argument("name", help="the rollout")

    history = sub.add_parser("history", help="a tenant's switches, windows and failures, oldest first")
    history.add_argument("tenant", help="the tenant, or '*' for the global switch")
    history.add_argument("--limit", type=int, default=50, help="latest N events (default %(default)s)")
    history.add_argument("--json", action="store_true", help="print a JSON array")


def _target(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("tenant", nargs="?", help="the tenant")
    group.add_argument("--all", action="store_true", help="the global switch: every tenant")


def _count(value: str) -> int:
    return _seconds(value)


def _positive(value: str) -> int:
    number = _seconds(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value!r}")
    return number


def _seconds(value: str) -> int:
    try:
        seconds = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {value!r}") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value!r}")
    return seconds


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _when(value: str) -> datetime:
    """An aware datetime from ISO 8601 (naive means UTC), or now plus ``+90s``, ``+30m``, ``+2h``, ``+1d``."""
    text = value.strip()
    try:
        if text.startswith("+") and text[-1:] in _UNITS and text[1:-1].isdigit():
            return (utcnow() + timedelta(seconds=int(text[1:-1]) * _UNITS[text[-1]])).astimezone(UTC)
        moment = datetime.fromisoformat(text)
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time or +N[smhd]: {value!r}") from None
    except OverflowError:
        raise argparse.ArgumentTypeError(f"out of range: {value!r}") from None


def _until(value: str) -> datetime:
    """:func:`_when`, not in the past: a window that is already over would do nothing."""
    moment = _when(value)
    if moment <= utcnow():
        raise argparse.ArgumentTypeError(f"{value!r} is in the past: such a window is already over")
    return moment


class _Parser(argparse.ArgumentParser):
    """argparse, whose error messages (which quote the command line) cannot rewrite the terminal."""

    def error(self, message: str) -> NoReturn:
        super().error(printable(message))


def execute(
    args: argparse.Namespace,
    store: MaintenanceStore,
    stream: Any,
    builtins: Mapping[str, BuiltinMigration] | None = None,
) -> None:
    """Carry out one parsed command of :func:`add_commands` on ``store``, writing to ``stream``.

    Text has its control characters escaped; JSON is written as is. Errors are raised
    (:func:`failure` turns them into one line).
    """
    out = Terminal(stream)
    if args.command == "init":
        store.create_tables()
        out.line(f"maintgate tables ready in {store.engine.url.render_as_string(hide_password=True)}")
    elif args.command == "status":
        rows = report.status(store, args.tenant)
        if args.json:
            out.raw(json.dumps(rows, indent=2))
        else:
            for row in rows:
                out.lines(report.status_lines(row))
            if not rows:
                out.line("no tenant has ever been in maintenance")
    elif args.command == "on":
        tenant = ALL_TENANTS if args.all else args.tenant
        if args.at is not None or args.until is not None:
            window = store.schedule(
                tenant,
                args.at or utcnow(),
                args.until,
                message=args.message,
                mode=args.mode,
                retry_after=args.retry_after,
            )
            out.line(f"{tenant}: scheduled #{window.id} {report.span(window)}")
        else:
            store.activate(tenant, message=args.message, retry_after=args.retry_after, mode=args.mode)
            out.lines(report.status_lines(report.status(store, tenant)[0]))
    elif args.command == "unschedule":
        if not store.unschedule(args.id):
            raise MaintgateError(f"no planned window #{args.id}")
        out.line(f"cancelled planned window #{args.id}")
    elif args.command == "off":
        tenant = ALL_TENANTS if args.all else args.tenant
        ended = store.deactivate(tenant)
        out.lines(report.ended_lines(ended, report.status(store, tenant)[0]))
    elif args.command == "release":
        released = store.release_window(args.tenant)
        if released is None:
            raise MaintgateError(f"no window holds tenant {args.tenant!r}")
        owner = released.owner
        who = f" ({owner.host} pid {owner.pid})" if owner else ""
        out.line(
            f"{args.tenant}: released window {released.window_id}{who}; maintenance stays on "
            f"until `maintgate off {args.tenant}`"
        )
    elif args.command == "history":
        entries = store.history(args.tenant, limit=args.limit)
        if args.json:
            out.raw(json.dumps([report.history_json(e) for e in entries], indent=2))
        out.lines([] if args.json else [report.history_line(e) for e in entries])
    elif args.command == "rollout":
        _rollout(args, store, out, stream, builtins or {})
    else:
        raise MaintgateError(f"unknown command {args.command!r}")


def _rollout(
    args: argparse.Namespace,
    store: MaintenanceStore,
    out: Terminal,
    stream: Any,
    builtins: Mapping[str, BuiltinMigration],
) -> None:
    from . import fleet

    if args.rollout_command == "stop":
        if not fleet.stop_rollout(store, args.name):
            raise MaintgateError(f"no rollout named {args.name!r}")
        out.line(f"rollout {args.name}: its runners claim no new tenant; open windows finish")
        return
    if args.rollout_command == "status":
        status = fleet.rollout_status(store, args.name)
        if status is None:
            raise MaintgateError(f"no rollout named {args.name!r}")
        if args.json:
            out.raw(json.dumps(status, indent=2))
        else:
            out.lines(report.rollout_lines(status))
        return
    builtin = builtins.get(args.call)
    options: dict[str, Any] = {"concurrency": args.concurrency}
    if builtin is None:
        migrate = _callable(args.call)
    else:
        if builtin.check is not None:
            builtin.check()
        migrate = builtin.migrate
        options["opener"] = builtin.opener
        if builtin.concurrency is not None and args.concurrency > builtin.concurrency:
            options["concurrency"] = builtin.concurrency
            out.line(
                f"rollout {args.name}: {args.call} runs {builtin.concurrency} window(s) at a time in a "
                "process; start more runners of this rollout for more (PostgreSQL)"
            )
    tenants = _tenant_list(args.tenants)
    progress = report.ProgressBar(stream, args.name)
    stop, abort = threading.Event(), threading.Event()

    def interrupted(signum: int, frame: Any) -> None:
        if stop.is_set():
            abort.set()
            out.line(f"rollout {args.name}: aborting the open windows (they fail: maintenance stays on)")
        else:
            stop.set()
            out.line(
                f"rollout {args.name}: interrupted: no new tenant is claimed; open windows finish "
                "(interrupt again to abort them)"
            )

    handled = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupted) if handled else None
    try:
        result = fleet.rollout(
            store,
            args.name,
            tenants,
            migrate,
            canary=args.canary,
            max_failures=args.max_failures,
            message=args.message,
            retry_after=args.retry_after,
            retry_failed=args.retry_failed,
            on_progress=progress.update,
            stop=stop,
            abort=abort,
            **options,
        )
    finally:
        if handled:
            signal.signal(signal.SIGINT, previous)
    progress.close()
    out.lines(report.rollout_result_lines(result))
    if result.failed or result.not_started:
        raise MaintgateError(
            f"rollout {args.name} is not complete: `maintgate rollout status {args.name}` lists the "
            f"failures; fix them and run it again with --retry-failed"
        )


def _callable(spec: str) -> Any:
    """``package.module:function``, imported."""
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise MaintgateError(f"--call takes package.module:function, got {spec!r}")
    try:
        target = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise MaintgateError(f"cannot import {spec!r}: {exc}") from None
    except Exception as exc:  # the module itself fails as it is imported
        raise MaintgateError(f"cannot import {spec!r}: {type(exc).__name__}: {exc}") from None
    if not callable(target):
        raise MaintgateError(f"{spec!r} is not callable")
    return target


def _tenant_list(path: str) -> list[str]:
    """Tenants, one per line, from a file or stdin (``-``); blank lines and ``#`` comments skipped."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise MaintgateError(f"cannot read the tenant list {path!r}: {exc.strerror}") from None
    lines = (line.strip() for line in text.removeprefix("\ufeff").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def failure(exc: BaseException, url: str = "") -> str | None:
    """The one line that reports ``exc`` to an operator, or None if it is not an error we expect."""
    if isinstance(exc, MaintgateError | ValueError):
        return f"error: {exc}"
    if isinstance(exc, ModuleNotFoundError):
        return f"error: {explain(exc, url)}"
    if isinstance(exc, SQLAlchemyError):
        return f"database error: {explain(exc, url)}"
    return None


def _refuse_missing_sqlite_file(url: str, command: str) -> None:
    """Reading a SQLite file that is not there would create it, empty: say what to do instead."""
    try:
        parsed = make_url(url)
    except Exception:
        return  # the store says what is wrong with the URL
    path = parsed.database
    if parsed.get_backend_name() != "sqlite" or not path or path == ":memory:" or command == "init":
        return
    if not os.path.exists(path):
        raise MaintgateError(
            f"no SQLite database at {path}: run `maintgate init` to create maintgate's tables there, "
            "or pass --database-url (or set MAINTGATE_DATABASE_URL)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``maintgate`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(sys.stdout)
        _refuse_missing_sqlite_file(args.database_url, args.command)
        store = MaintenanceStore(args.database_url, table_prefix=args.table_prefix, schema=args.schema)
        try:
            execute(args, store, sys.stdout)
        finally:
            store.engine.dispose()
        return 0
    except KeyboardInterrupt:
        print("maintgate: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): nothing more to say to it
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so that the interpreter's flush at exit is quiet
        return 1
    except Exception as exc:
        line = failure(exc, args.database_url)
        if line is None:
            raise
        Terminal(sys.stderr).line(f"maintgate: {line}")
        return 1
