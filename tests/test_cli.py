"""The ``maintgate`` command, run as a real process against a SQLite file and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from maintgate import MaintenanceStore, maintenance_window


def cli(store: MaintenanceStore, *args: str, env_url: bool = False) -> subprocess.CompletedProcess[str]:
    url = store.engine.url.render_as_string(hide_password=False)
    prefix = ["--table-prefix", store.tables.state.name.removesuffix("state")]
    cmd = [sys.executable, "-m", "maintgate", *([] if env_url else ["--database-url", url]), *prefix, *args]
    env = {"MAINTGATE_DATABASE_URL": url, "PATH": "/usr/bin:/bin"} if env_url else None
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_on_status_off_history(store):
    done = cli(store, "on", "demo", "--message", "Renaming", "--retry-after", "600")
    assert done.returncode == 0, done.stderr
    state = store.get("demo")
    assert state.active and state.message == "Renaming" and state.retry_after == 600

    rows = json.loads(cli(store, "status", "--json").stdout)
    assert rows == [
        {
            **rows[0],
            "tenant": "demo",
            "active": True,
            "message": "Renaming",
            "error": None,
            "owner": None,
            "owner_alive": None,
        }
    ]
    assert "demo: IN MAINTENANCE" in cli(store, "status", "demo").stdout

    assert cli(store, "off", "demo").returncode == 0
    assert not store.get("demo").active
    assert cli(store, "on", "--all", "--message", "upgrade").returncode == 0
    assert store.get("*").active
    assert cli(store, "off", "--all", env_url=True).returncode == 0
    assert not store.get("*").active

    history = json.loads(cli(store, "history", "demo", "--json").stdout)
    assert [h["event"] for h in history] == ["activated", "deactivated"]
    assert "activated" in cli(store, "history", "demo").stdout


def test_status_reports_the_error_and_a_live_window_owner(store):
    with pytest.raises(RuntimeError), maintenance_window(store, "demo", message="Renaming"):
        raise RuntimeError("column already exists")
    (row,) = json.loads(cli(store, "status", "demo", "--json").stdout)
    assert row["active"] and row["error"] == "RuntimeError: column already exists"
    assert row["owner"] is None and row["owner_alive"] is None
    with maintenance_window(store, "other"):
        (row,) = json.loads(cli(store, "status", "other", "--json").stdout)
        assert row["owner"]["pid"] > 0 and row["owner_alive"] is True


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["on", "bad id"], "invalid tenant id"),
        (["on", "demo", "--retry-after", "soon"], "not a whole number"),
        (["on"], "required"),
        (["explode"], "invalid choice"),
    ],
)
def test_errors_are_one_line_without_traceback(store, args, fragment):
    done = cli(store, *args)
    assert done.returncode != 0
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr


def test_unreachable_database_is_one_clear_line():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "maintgate",
            "--database-url",
            "postgresql+psycopg://postgres@127.0.0.1:9/x",
            "status",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("maintgate: database error:") and done.stderr.count("\n") == 1


def test_init_creates_the_tables_where_the_environment_points(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    for _ in range(2):  # idempotent
        done = subprocess.run(
            [sys.executable, "-m", "maintgate", "init"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"MAINTGATE_DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        )
        assert done.returncode == 0, done.stderr
    store = MaintenanceStore(url)
    assert store.all() == [] and store.history("demo") == []
    store.engine.dispose()


def test_on_at_until_schedules_and_status_lists_upcoming_windows(store):
    done = cli(
        store, "on", "demo", "--at", "+1h", "--until", "+2h", "--message", "Planned", "--mode", "read_only"
    )
    assert done.returncode == 0, done.stderr
    assert "scheduled #" in done.stdout
    (planned,) = store.schedules("demo")
    assert planned.mode == "read_only" and planned.message == "Planned"
    assert (planned.ends_at - planned.starts_at).total_seconds() == pytest.approx(3600, abs=5)
    (row,) = json.loads(cli(store, "status", "--json").stdout)
    assert row["tenant"] == "demo" and not row["active"]
    assert row["scheduled"] == [
        {
            "id": planned.id,
            "starts_at": planned.starts_at.isoformat(),
            "ends_at": planned.ends_at.isoformat(),
            "mode": "read_only",
            "message": "Planned",
        }
    ]
    assert f"scheduled #{planned.id}" in cli(store, "status").stdout
    assert cli(store, "on", "demo", "--until", "2099-01-01T00:00:00").returncode == 0
    assert store.effective("demo") is not None, "--until alone starts now"
    assert cli(store, "unschedule", str(planned.id)).returncode == 0
    missing = cli(store, "unschedule", str(planned.id))
    assert missing.returncode == 1 and "no planned window" in missing.stderr
    bad = cli(store, "on", "demo", "--at", "tomorrow")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


def test_nothing_the_cli_prints_can_rewrite_the_terminal(store):
    """Issue 11, point 3: stored text that clears the screen or forges a history line is shown
    escaped, in status, history, and errors alike; JSON stays JSON."""
    forged = "2026-01-01T00:00:00+00:00  window_committed  all good"
    hostile = f"ada@example.com\x1b[2J\x1b[H\r\n{forged}\x07\x9b31m"
    store.activate("demo", message=hostile)
    for args in (("status",), ("status", "demo"), ("history", "demo"), ("off", "demo"), ("on", "demo")):
        done = cli(store, *args, *(("--message", hostile) if args[0] == "on" else ()))
        assert done.returncode == 0, done.stderr
        shown = done.stdout
        assert not any(ch in shown for ch in "\x1b\x07\r\x9b"), (args, shown)
        assert args[0] == "off" or "\\x1b[2J" in shown, (args, shown)
        lines = [line for line in shown.splitlines() if line]
        assert not any(line.startswith("2026-01-01T00:00:00") for line in lines), (args, shown)
    rows = json.loads(cli(store, "history", "demo", "--json").stdout)
    assert any(hostile in (row.get("message") or "") for row in rows), "JSON keeps the data, escaped by JSON"
    done = cli(store, "release", "x\x1b[2Jy")
    assert done.returncode != 0 and "\x1b" not in done.stderr and "\\x1b" in done.stderr


def test_first_mistakes_get_one_line_that_says_what_to_do(tmp_path):
    """Issue 11, point 2: a missing driver, postgres://, tables not created, a missing SQLite
    file (not created by status), and --version."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "maintgate", *args], capture_output=True, text=True, timeout=60
        )

    assert run("--version").stdout.strip().startswith("maintgate ")
    cases = {
        "postgresql+pg8000://u@h/db": "maintgate[postgres]",
        "mysql+mysqldb://u@h/db": "maintgate[mysql]",
        "postgres://u@h/db": "postgresql://",
        f"sqlite:///{tmp_path / 'missing.db'}": "maintgate init",
    }
    for url, hint in cases.items():
        done = run("--database-url", url, "status")
        assert done.returncode == 1 and hint in done.stderr, (url, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "missing.db").exists(), "status must not create the file"
    empty = tmp_path / "empty.db"
    empty.touch()
    done = run("--database-url", f"sqlite:///{empty}", "status")
    assert done.returncode == 1 and "run `maintgate init`" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_help_texts_carry_no_markup():
    commands = ["", "init", "status", "on", "unschedule", "off", "release", "history", "demo"]
    for command in commands:
        done = subprocess.run(
            [sys.executable, "-m", "maintgate", *([command] if command else []), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0
        assert not any(mark in done.stdout for mark in ("``", ":class:", ":func:", ":meth:")), done.stdout
