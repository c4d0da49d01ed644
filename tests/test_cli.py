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


def run(store: MaintenanceStore, capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (faster than a subprocess where the process does not matter)."""
    from maintgate.cli import main

    url = store.engine.url.render_as_string(hide_password=False)
    prefix = ["--table-prefix", store.tables.state.name.removesuffix("state")]
    code = main(["--database-url", url, *prefix, *args])
    out, err = capsys.readouterr()
    return code, out, err


def status_json(store, capsys, *args: str) -> dict[str, dict]:
    code, out, err = run(store, capsys, "status", *args, "--json")
    assert code == 0, err
    return {row["tenant"]: row for row in json.loads(out)}


def test_status_shows_what_the_gate_answers_now_and_why(store, capsys):
    from datetime import timedelta

    from maintgate import ALL_TENANTS, MaintenanceMiddleware
    from maintgate.core.state import utcnow
    from maintgate.tenants import from_header
    from tests.conftest import asgi_call, ok_app

    gate = MaintenanceMiddleware(ok_app, store, tenant=from_header("X-Tenant-ID"))

    def answered(tenant: str, method: str = "POST") -> int:
        return asgi_call(gate, headers={"X-Tenant-ID": tenant}, method=method)[0]

    now = utcnow()
    planned = store.schedule("demo", now - timedelta(minutes=1), now + timedelta(hours=1), message="Planned")
    store.activate("other", mode="read_only")
    rows = status_json(store, capsys)
    assert answered("demo") == 503 and answered("other") == 503 and answered("other", "GET") == 200
    demo = rows["demo"]
    assert demo["active"] is False, "its own switch is off ..."
    assert demo["effective"] == "maintenance" and demo["reason"] == f"schedule #{planned.id}", demo
    assert rows["other"]["effective"] == "read_only" and rows["other"]["reason"] == "its own switch"
    assert run(store, capsys, "status", "demo")[0] == 0
    text = run(store, capsys, "status", "demo")[1]
    assert text.startswith("demo: IN MAINTENANCE") and f"because of schedule #{planned.id}" in text, text

    store.activate(ALL_TENANTS, message="Everyone")
    rows = status_json(store, capsys)
    assert answered("other", "GET") == 503
    assert rows["other"]["effective"] == "maintenance", "the global switch is stricter than read-only"
    assert rows["other"]["reason"] == "the global switch"
    assert rows["other"]["reasons"] == ["the global switch", "its own switch"]
    fresh = status_json(store, capsys, "fresh")["fresh"]
    assert answered("fresh") == 503
    assert fresh["effective"] == "maintenance" and fresh["reason"] == "the global switch", fresh
    assert "fresh: IN MAINTENANCE because of the global switch" in run(store, capsys, "status", "fresh")[1]

    store.deactivate(ALL_TENANTS)
    store.deactivate("other")
    rows = status_json(store, capsys)
    assert answered("other") == 200
    assert rows["other"]["effective"] == "serving" and rows["other"]["reason"] is None
    assert run(store, capsys, "status", "other")[1].startswith("other: serving")

    with maintenance_window(store, "busy"):
        row = status_json(store, capsys, "busy")["busy"]
        assert answered("busy") == 503
        assert row["effective"] == "maintenance" and row["reason"].startswith("window "), row
        store.activate("busy", mode="read_only", message="operator")  # the window's full mode wins
        row = status_json(store, capsys, "busy")["busy"]
        assert answered("busy", "GET") == 503 and row["effective"] == "maintenance"
        assert row["reason"].startswith("its own switch and window "), row
    gate.gate.close()


def test_off_says_what_it_ended(store, capsys):
    from datetime import timedelta

    from maintgate import ALL_TENANTS
    from maintgate.core.state import utcnow

    now = utcnow()
    first = store.schedule("demo", now - timedelta(minutes=5), now + timedelta(hours=1))
    second = store.schedule("demo", now - timedelta(minutes=1))
    later = store.schedule("demo", now + timedelta(days=1), now + timedelta(days=2))
    code, out, err = run(store, capsys, "off", "demo")
    assert code == 0, err
    assert "was not in maintenance" not in out
    assert f"schedule #{first.id}" in out and f"schedule #{second.id}" in out, out
    assert f"#{later.id}" in out and "still planned" in out, "what it left is said too"
    assert status_json(store, capsys, "demo")["demo"]["effective"] == "serving"

    store.activate("demo")
    store.activate(ALL_TENANTS)
    out = run(store, capsys, "off", "demo")[1]
    assert "ended its own switch" in out and "still in maintenance: the global switch" in out, out
    code, out, _ = run(store, capsys, "off", "demo")
    assert code == 0 and "nothing to end" in out, out


def test_off_after_a_crashed_window_clears_its_dead_owner(store, capsys):
    import time

    from maintgate.core.state import Owner

    crashed = store.open_window("demo", Owner("crashed-host", 4242), lease=0.05)
    time.sleep(0.2)
    row = status_json(store, capsys, "demo")["demo"]
    assert row["window"]["id"] == crashed.id and row["window"]["alive"] is False
    code, out, err = run(store, capsys, "off", "demo")
    assert code == 0, err
    assert f"cleared window {crashed.id}" in out and "crashed-host pid 4242" in out, out
    row = status_json(store, capsys, "demo")["demo"]
    assert row["window"] is None and row["owner"] is None and row["effective"] == "serving", row
    assert "window_released" in [e.event for e in store.history("demo")]

    with maintenance_window(store, "demo") as conn:
        running = store.get("demo", connection=None).window_id
        code, out, _ = run(store, capsys, "off", "demo")
        assert f"window {running} " in out and "still runs" in out, out
        assert store.get("demo").window_id == running, "a live window is reported, never cleared"
        assert conn is not None


def test_lines_of_several_rows_each_start_a_line_and_data_cannot(store, capsys):
    from datetime import timedelta

    from maintgate.core.state import utcnow

    now = utcnow()
    store.schedule("demo", now + timedelta(hours=1), now + timedelta(hours=2), message="one\nforged line")
    store.schedule("demo", now + timedelta(days=1))
    code, out, _ = run(store, capsys, "status", "demo")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3, out
    assert lines[0] == "demo: serving" and all(line.startswith("    scheduled #") for line in lines[1:])
    assert "one\\nforged line" in lines[1], "a newline in the data is escaped"
    code, out, _ = run(store, capsys, "off", "demo")
    lines = out.splitlines()
    assert len(lines) == 4 and all(line.startswith("  ") for line in lines[1:]), out


def test_status_json_is_json_even_with_nothing_recorded_and_lists_each_schedule_once(store, capsys):
    from datetime import timedelta

    from maintgate.core.state import utcnow

    code, out, _ = run(store, capsys, "status", "--json")
    assert code == 0 and json.loads(out) == []
    now = utcnow()
    planned = store.schedule("*", now - timedelta(minutes=1), now + timedelta(hours=1), mode="read_only")
    for args in (["status", "*"], ["status"]):
        (row,) = status_json(store, capsys, *args[1:]).values()
        assert [s["id"] for s in row["scheduled"]] == [planned.id], args
        assert row["reasons"] == [f"global schedule #{planned.id}"], args
    code, out, _ = run(store, capsys, "off", "--all")
    assert out.count(f"#{planned.id}") == 1, out


def test_times_out_of_range_or_already_past_are_refused_in_one_line(store, capsys):
    for args in (
        ["on", "demo", "--until", "+99999999999d"],
        ["on", "demo", "--until", "+9999999d"],
        ["on", "demo", "--at", "0001-01-01T00:30:00+01:00"],
        ["on", "demo", "--at", "2020-01-01", "--until", "2020-01-02"],
    ):
        with pytest.raises(SystemExit) as exited:
            run(store, capsys, *args)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and "Traceback" not in err, (args, err)
        assert "maintgate on: error:" in err, (args, err)
    assert store.schedules() == []


def test_what_argparse_echoes_and_stored_bidi_controls_cannot_rewrite_the_terminal(store, capsys):
    with pytest.raises(SystemExit):
        run(store, capsys, "status", "demo", "\x1b]0;pwned\x07")
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\\x1b" in err, err
    store.activate("demo", message="evil\u202edesrever\u2028forged")
    out = run(store, capsys, "history", "demo")[1]
    assert "\u202e" not in out and "\u2028" not in out and "\\u202e" in out, out
