"""Fleet rollout: one migration across many tenants, each in its own window (issue 12)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text

from maintgate import InvalidArgument, rollout
from maintgate.fleet import RolloutBusy, rollout_status, stop_rollout
from tests.fleet import Fleet
from tests.helpers import events, without_server_functions

ROOT = Path(__file__).resolve().parent.parent


def test_200_tenants_where_3_fail_end_197_migrated_and_serving_3_in_maintenance(store, fleet):
    f = fleet(200)
    broken = {f.tenants[7], f.tenants[100], f.tenants[199]}
    report = rollout(
        store, "rename-email", f.tenants, lambda c, t: f.migrate(c, t, broken), max_failures=None
    )
    assert sorted(report.done) == sorted(set(f.tenants) - broken)
    assert set(report.failed) == broken and all("NOT NULL" in e for e in report.failed.values())
    assert report.not_started == () and report.stopped is None
    assert f.migrated() == dict.fromkeys(report.done, 1), (
        "each done tenant migrated once; failures rolled back"
    )
    for tenant in f.tenants:
        state = store.get(tenant)
        if tenant in broken:
            assert state.active and "NOT NULL" in state.error and not f.renamed(tenant)
        else:
            assert not state.active and f.renamed(tenant)
    status = rollout_status(store, "rename-email")
    assert (status["done"], status["failed"], status["pending"]) == (197, 3, 0)
    assert {x["tenant"] for x in status["failures"]} == broken

    again = rollout(store, "rename-email", f.tenants, f.migrate, retry_failed=True)
    assert sorted(again.done) == sorted(broken) and len(again.skipped) == 197 and again.complete
    assert f.migrated() == dict.fromkeys(f.tenants, 1)
    assert not any(store.get(t).active for t in f.tenants)


def test_a_canary_failure_stops_the_rollout_and_leaves_the_fleet_untouched(store, fleet):
    f = fleet(30)
    report = rollout(
        store, "canary", f.tenants, lambda c, t: f.migrate(c, t, {f.tenants[2]}), canary=5, concurrency=2
    )
    assert report.stopped and "canary failed" in report.stopped and f.tenants[2] in report.stopped
    assert set(report.done) <= set(f.tenants[:5]) and set(report.failed) == {f.tenants[2]}
    untouched = f.tenants[5:]
    assert set(untouched) <= set(report.not_started)
    assert not any(f.renamed(t) or store.get(t) for t in untouched), "never started: serving, no window"


def test_the_failure_budget_stops_claiming_and_says_why(store, fleet):
    f = fleet(20)
    broken = set(f.tenants[::3])
    report = rollout(
        store, "budget", f.tenants, lambda c, t: f.migrate(c, t, broken), max_failures=2, concurrency=1
    )
    assert len(report.failed) == 2 and report.stopped and "failure budget" in report.stopped
    assert "(max_failures=2)" in report.stopped
    zero = rollout(store, "budget-0", f.tenants, lambda c, t: f.migrate(c, t, broken), concurrency=1)
    assert len(zero.failed) == 1 and "(max_failures=0)" in zero.stopped
    assert report.not_started and not any(store.get(t) for t in report.not_started)
    first_stop = rollout(store, "budget", f.tenants, f.migrate, max_failures=2)
    assert first_stop.done == () and "failure budget" in first_stop.stopped, "a spent budget stays spent"


def test_a_stopped_rollout_resumes_where_it_stopped(store, fleet):
    f = fleet(40)
    stop = threading.Event()
    migrate = f.stopping_after(f.tenants[9], stop)
    first = rollout(store, "resume", f.tenants, migrate, stop=stop, concurrency=1)
    assert first.stopped and len(first.done) == 10 and len(first.not_started) == 30
    second = rollout(store, "resume", f.tenants, f.migrate)
    assert sorted(second.skipped) == sorted(first.done) and len(second.done) == 30 and second.complete
    assert f.migrated() == dict.fromkeys(f.tenants, 1)
    assert stop_rollout(store, "resume") and not stop_rollout(store, "no-such-rollout")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_runs_one_runner_at_a_time_and_says_so(store, fleet):
    f = fleet(3)
    inside, release = threading.Event(), threading.Event()
    done: list[object] = []

    def slow(conn, tenant):
        inside.set()
        release.wait(10)
        f.migrate(conn, tenant)

    first = threading.Thread(target=lambda: done.append(rollout(store, "solo", f.tenants, slow)))
    first.start()
    try:
        assert inside.wait(10)
        with pytest.raises(RolloutBusy, match="one runner"):
            rollout(store, "solo", f.tenants, f.migrate)
    finally:
        release.set()
        first.join(30)
    assert done and done[0].complete


def _runner(store, name: str, f: Fleet, pause: float, concurrency: int = 2, lease: float = 1.0, *more: str):
    url = store.engine.url.render_as_string(hide_password=False)
    prefix = store.tables.state.name.removesuffix("state")
    args = [url, prefix, name, f.tag, str(len(f.tenants)), str(pause), str(concurrency), str(lease), *more]
    command = [sys.executable, "-m", "tests.fleet", *args]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_runner_killed_mid_rollout_is_taken_over_and_every_tenant_is_migrated_once(store, fleet):
    f = fleet(40)
    process = _runner(store, "killed", f, pause=0.05)
    deadline = time.monotonic() + 60
    while (rollout_status(store, "killed") or {}).get("done", 0) < 10 and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # mid-window, most likely: it sleeps inside each one
    err = process.communicate(timeout=10)[1]
    killed = rollout_status(store, "killed")
    assert 10 <= killed["done"] < 40, (killed, err[-3000:])
    if store.engine.dialect.name == "sqlite":
        with pytest.raises(RolloutBusy):  # its lease may still run: SQLite waits for it to end
            rollout(store, "killed", f.tenants, f.migrate, lease=1.0)
        time.sleep(1.1)
    report = rollout(store, "killed", f.tenants, f.migrate, lease=1.0)
    assert report.complete, report
    assert f.migrated() == dict.fromkeys(f.tenants, 1), "every tenant migrated exactly once"
    assert not any(store.get(t).active for t in f.tenants), "the dead runner's windows were taken over"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_runner_processes_share_one_plan_and_never_migrate_a_tenant_twice(store, fleet):
    f = fleet(60)
    runners = [_runner(store, "shared", f, pause=0.02, lease=30.0) for _ in range(2)]
    outputs = [r.communicate(timeout=120) for r in runners]
    assert all(r.returncode == 0 for r in runners), outputs
    did = [int(out.split()[-1]) for out, _ in outputs]
    assert sum(did) == 60 and all(n > 0 for n in did), f"both runners did work: {did}"
    assert f.migrated() == dict.fromkeys(f.tenants, 1)


def test_a_live_gate_answers_503_for_exactly_the_tenants_whose_windows_are_open(store, fleet):
    import random
    from contextlib import contextmanager

    from maintgate import WSGIMaintenanceMiddleware
    from maintgate.fleet import sqlalchemy_window
    from maintgate.tenants import from_header
    from tests.conftest import ok_wsgi, wsgi_call

    f = fleet(40)
    gate = WSGIMaintenanceMiddleware(ok_wsgi, store, tenant=from_header("X-Tenant-ID"), cache_ttl=0.05)
    assert all(wsgi_call(gate, t) == 200 for t in f.tenants)
    opening: set[str] = set()  # its window may be opening, open or closing
    inside: set[str] = set()  # its window is open: the switch-on committed, the switch-off not yet
    closed: set[str] = set()  # its window committed
    lock = threading.Lock()
    finished = threading.Event()

    @contextmanager
    def watched(store, tenant, **options):
        with lock:
            opening.add(tenant)
        with sqlalchemy_window(store, tenant, **options) as (handed, conn):
            with lock:
                inside.add(tenant)
            yield handed, conn
            with lock:
                inside.discard(tenant)
        with lock:
            closed.add(tenant)

    def migrate(conn, tenant):
        f.migrate(conn, tenant)
        time.sleep(0.03)  # windows overlap, and the sampler finds them open

    samples = {"open": 0, "never opened": 0, "closed": 0}
    wrong: list[tuple[str, str, int]] = []

    def sample() -> None:
        while not finished.is_set():
            tenant = random.choice(f.tenants)
            with lock:
                before = (tenant in opening, tenant in inside, tenant in closed)
            status = wsgi_call(gate, tenant)
            with lock:
                after = (tenant in opening, tenant in inside, tenant in closed)
            if before[1] and after[1]:
                kind, expected = "open", 503
            elif not after[0]:
                kind, expected = "never opened", 200
            elif before[2]:
                kind, expected = "closed", 200
            else:
                continue  # opening or closing during the call: either answer is right
            samples[kind] += 1
            if status != expected:
                wrong.append((kind, tenant, status))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        report = rollout(store, "live", f.tenants, migrate, concurrency=4, opener=watched)
    finally:
        finished.set()
        sampler.join(30)
    gate.gate.close()
    assert report.complete and closed == set(f.tenants)
    assert wrong == [], wrong[:5]
    assert all(n >= 20 for n in samples.values()), samples


def _cli(store, *args: str, env: dict[str, str] | None = None, **popen):
    import os

    url = store.engine.url.render_as_string(hide_password=False)
    prefix = store.tables.state.name.removesuffix("state")
    command = [sys.executable, "-m", "maintgate", "--database-url", url, "--table-prefix", prefix, *args]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_the_cli_runs_reports_retries_and_stops_a_rollout(store, fleet, tmp_path):
    import json

    f = fleet(12)
    listing = tmp_path / "tenants.txt"
    listing.write_text("# the fleet\n" + "\n".join(f.tenants) + "\n\n")
    run = ["rollout", "run", "cli", "--tenants", str(listing), "--call", "tests.fleet:migrate"]
    failing = _cli(store, *run, "--max-failures", "3", env={"FLEET_FAIL": f.tenants[4]})
    out, err = failing.communicate(timeout=120)
    assert failing.returncode == 1 and "not complete" in err and "Traceback" not in err, err
    assert "rollout cli: 11 migrated now" in out and f"failed {f.tenants[4]}" in out, out
    assert "/12 done" in out.splitlines()[0] and "\r" not in out, "plain progress lines, no bar"
    status = _cli(store, "rollout", "status", "cli", "--json")
    data = json.loads(status.communicate(timeout=60)[0])
    assert (data["done"], data["failed"]) == (11, 1) and "NOT NULL" in data["failures"][0]["error"]
    assert store.get(f.tenants[4]).active, "the failed tenant stays in maintenance"
    retry = _cli(store, *run, "--retry-failed")
    out, err = retry.communicate(timeout=120)
    assert retry.returncode == 0 and "1 migrated now, 11 done before, 0 failed" in out, (out, err)
    assert f.migrated() == dict.fromkeys(f.tenants, 1) and not store.get(f.tenants[4]).active
    stopped = _cli(store, "rollout", "stop", "cli")
    assert stopped.communicate(timeout=60)[0].startswith("rollout cli: its runners claim no new tenant")
    assert rollout_status(store, "cli")["stopped"]


@pytest.mark.parametrize("interrupts", [1, 2])
def test_ctrl_c_stops_claiming_and_a_second_ctrl_c_aborts_the_open_windows(
    store, fleet, tmp_path, interrupts
):
    f = fleet(20)
    listing = tmp_path / "tenants.txt"
    listing.write_text("\n".join(f.tenants))
    run = ["rollout", "run", "ctrl-c", "--tenants", str(listing), "--call", "tests.fleet:migrate"]
    process = _cli(store, *run, "--concurrency", "2", env={"FLEET_PAUSE": "0.4"})
    deadline = time.monotonic() + 60
    while (rollout_status(store, "ctrl-c") or {}).get("done", 0) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()  # it ended before it was interrupted
        time.sleep(0.02)
    for _ in range(interrupts):
        process.send_signal(signal.SIGINT)
        time.sleep(0.05)
    out, err = process.communicate(timeout=60)
    status = rollout_status(store, "ctrl-c")
    assert "stopped: this runner was stopped (interrupted)" in out, (status, out, err)
    assert status["stopped"] is None, "an interrupted runner stops itself, not the rollout's other runners"
    assert status["pending"] > 0 and status["running"] == 0, status
    if interrupts == 1:
        assert status["failed"] == 0, "open windows finished"
    else:
        assert status["failed"] >= 1 and all("aborted" in x["error"] for x in status["failures"]), status
        assert all(store.get(x["tenant"]).active for x in status["failures"]), "maintenance stays on"
    assert f.migrated() == dict.fromkeys([t for t in f.tenants if f.migrated().get(t)], 1)


def test_the_progress_bar_redraws_one_line_on_a_terminal():
    import io

    from maintgate.fleet import Progress
    from maintgate.report import ProgressBar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    bar = ProgressBar(screen, "rename")
    bar.update(Progress(total=100, done=40, failed=2, running=4, elapsed=10.0, done_here=40))
    bar.update(Progress(total=100, done=50, failed=2, running=4, elapsed=12.5, done_here=50))
    bar.close()
    text = screen.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert (
        "50/100 done, 2 failed, 4 running, 4.0/s" in text and "11s left" in text and "[############" in text
    )


def test_what_a_rollout_cannot_do_is_refused_before_anything_changes(store, fleet):
    f = fleet(2)
    for tenants, option in (([f.tenants[0], "*"], "tenants"), (f.tenants[0], "tenants")):
        with pytest.raises(InvalidArgument) as refused:
            rollout(store, "refused", tenants, f.migrate)
        assert refused.value.option == option
    with pytest.raises(InvalidArgument, match="retry_after"):
        rollout(store, "refused", f.tenants, f.migrate, retry_after=-1)
    if store.engine.dialect.name == "postgresql":  # SQLite runs one window at a time anyway
        with pytest.raises(InvalidArgument, match=r"concurrency 16 needs 18 connections.*lends at most 15"):
            rollout(store, "refused", f.tenants, f.migrate, concurrency=16)
    assert rollout_status(store, "refused") is None and not any(store.get(t) for t in ["*", *f.tenants])


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_canary_holds_when_a_runner_joins_without_one_and_windows_run_concurrently_after_it(store, fleet):
    f = fleet(24)
    peak, open_now, lock = [0], [0], threading.Lock()

    def migrate(conn, tenant):
        with lock:
            open_now[0] += 1
            peak[0] = max(peak[0], open_now[0])
        time.sleep(0.25)
        with lock:
            open_now[0] -= 1
        f.migrate(conn, tenant)

    first = rollout(store, "canary-join", f.tenants, migrate, canary=1, concurrency=4)
    assert first.complete and peak[0] >= 2, f"after the canary, windows run at once again: peak {peak[0]}"

    g = fleet(12)
    stop = threading.Event()
    joined: list[object] = []

    def slow(conn, tenant):
        stop.wait(0.5)
        g.migrate(conn, tenant, {g.tenants[1]})

    starter = threading.Thread(
        target=lambda: joined.append(
            rollout(store, "canary-joined", g.tenants, slow, canary=3, concurrency=1)
        )
    )
    starter.start()
    time.sleep(0.2)
    second = rollout(store, "canary-joined", g.tenants, slow, concurrency=2)  # no canary of its own
    starter.join(30)
    assert second.stopped and "canary failed" in second.stopped, second
    assert all(store.get(t) is None for t in g.tenants[3:]), "past the canary, nothing was touched"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_stopping_one_runner_leaves_the_others_running(store, fleet):
    f = fleet(30)
    stop_a = threading.Event()
    reports: dict[str, object] = {}

    def migrate(conn, tenant):
        f.migrate(conn, tenant)
        time.sleep(0.05)
        stop_a.set()

    a = threading.Thread(
        target=lambda: reports.update(
            a=rollout(store, "one-stops", f.tenants, migrate, stop=stop_a, concurrency=1)
        )
    )
    a.start()
    b = rollout(store, "one-stops", f.tenants, migrate, concurrency=1)
    a.join(60)
    a_report = reports["a"]
    assert "this runner was stopped" in a_report.stopped
    assert b.stopped is None and b.complete, b
    accounted = set(a_report.done) | set(a_report.done_elsewhere) | set(a_report.not_started)
    assert accounted == set(f.tenants) and set(b.done_elsewhere) == set(a_report.done), "reports add up"
    assert f.migrated() == dict.fromkeys(f.tenants, 1)


def test_a_tenant_another_window_holds_all_along_fails_instead_of_spinning(store, fleet, monkeypatch):
    import maintgate.fleet
    from maintgate import maintenance_window

    monkeypatch.setattr(maintgate.fleet, "BUSY_RETRY", 0.05)
    monkeypatch.setattr(maintgate.fleet, "BUSY_ATTEMPTS", 3)
    f = fleet(2)
    with maintenance_window(store, f.tenants[0]):  # an operator's window, open throughout
        report = rollout(store, "busy", f.tenants, f.migrate, max_failures=None, lease=2.0)
    assert report.done == (f.tenants[1],) and "another window held the tenant" in report.failed[f.tenants[0]]
    assert rollout_status(store, "busy")["failures"][0]["attempts"] == 3


def test_the_cli_says_in_one_line_what_is_wrong_with_a_call_or_a_list(store, fleet, tmp_path):
    f = fleet(2)
    listing = tmp_path / "tenants.txt"
    listing.write_text("\ufeff" + f.tenants[0] + "\n   # an indented comment\n" + f.tenants[1] + "\n")
    broken = _cli(
        store, "rollout", "run", "x", "--tenants", str(listing), "--call", "tests.raises_on_import:f"
    )
    out, err = broken.communicate(timeout=60)
    assert broken.returncode == 1 and "Traceback" not in err and "cannot import" in err, err
    star = _cli(store, "rollout", "run", "x", "--tenants", "-", "--call", "tests.fleet:migrate", stdin=-1)
    out, err = star.communicate("*\n", timeout=60)
    assert star.returncode == 1 and "global switch" in err and store.get("*") is None, err
    ok = _cli(store, "rollout", "run", "x", "--tenants", str(listing), "--call", "tests.fleet:migrate")
    out, err = ok.communicate(timeout=60)
    assert ok.returncode == 0 and "2 migrated now" in out, (out, err)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("operator", [False, True])
def test_a_runner_that_stalls_past_its_lease_leaves_the_tenant_another_runner_migrated_serving(
    store, fleet, operator
):
    f = fleet(4)
    stalled = _runner(store, "stall", f, 0.0, 1, 1.0, "stall")
    first = stalled.stdout.readline().split()
    assert first[:1] == ["claimed"], stalled.communicate()
    tenant = first[1]
    try:
        time.sleep(1.5)  # its 1 s lease runs out while it is stopped
        other = rollout(store, "stall", f.tenants, f.migrate, concurrency=1, lease=1.0)
        assert other.complete and tenant in other.done and not store.get(tenant).active
        if operator:  # meanwhile an operator puts the tenant in maintenance for a reason of theirs
            store.activate(tenant, message="disk repair")
    finally:
        stalled.send_signal(signal.SIGCONT)
    _, err = stalled.communicate(timeout=60)
    assert stalled.returncode == 0, err[-2000:]
    if operator:
        state = store.effective(tenant)
        assert state.active and state.message == "disk repair", "the operator's switch is theirs to end"
    else:
        assert not store.get(tenant).active, "the stalled runner's late window left the tenant serving"
    status = rollout_status(store, "stall")
    assert (status["done"], status["failed"]) == (4, 0), status
    assert f.migrated() == dict.fromkeys(f.tenants, 1)


def test_a_runs_list_is_the_fleet_tenants_it_leaves_out_are_dropped_not_migrated(store, fleet):
    f = fleet(6)
    stop = threading.Event()
    migrate = f.stopping_after(f.tenants[1], stop)
    first = rollout(store, "drop", f.tenants, migrate, stop=stop, concurrency=1)
    assert first.done == tuple(f.tenants[:2])
    second = rollout(store, "drop", f.tenants[:4], f.migrate)  # tenants 4 and 5 were deleted
    assert sorted(second.done) == f.tenants[2:4] and second.dropped == tuple(f.tenants[4:]), second
    assert second.complete and set(f.migrated()) == set(f.tenants[:4])
    assert rollout_status(store, "drop")["dropped"] == 2
    with pytest.raises(InvalidArgument, match="no tenants"):
        rollout(store, "drop", [], f.migrate)
    third = rollout(store, "drop", f.tenants, f.migrate)  # listed again: pending again
    assert sorted(third.done) == f.tenants[4:] and third.complete
    assert f.migrated() == dict.fromkeys(f.tenants, 1)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("functions", [True, False], ids=["functions", "statements"])
def test_a_migrations_search_path_does_not_follow_the_pooled_connection_to_the_next_tenant(
    store, fleet, functions
):
    if not functions:
        without_server_functions(store)
    f = fleet(6)
    seen: dict[str, str] = {}
    with store.engine.connect() as conn:
        default = conn.execute(text("SHOW search_path")).scalar()
        for tenant in f.tenants:
            conn.execute(text(f'CREATE SCHEMA "{tenant}"'))
        conn.commit()
    try:

        def migrate(conn, tenant):
            seen[tenant] = conn.execute(text("SHOW search_path")).scalar()
            conn.execute(text(f'SET search_path TO "{tenant}"'))  # session-level, as people write it
            conn.execute(text("CREATE TABLE marker (id INTEGER)"))  # lands in the tenant's schema

        report = rollout(store, "paths", f.tenants, migrate, concurrency=1)
        assert report.complete
        assert seen == dict.fromkeys(f.tenants, default), seen
        with store.engine.connect() as conn:
            assert conn.execute(text("SHOW search_path")).scalar() == default
            placed = conn.execute(
                text("SELECT table_schema FROM information_schema.tables WHERE table_name = 'marker'")
            ).scalars()
            assert sorted(placed) == sorted(f.tenants)
    finally:
        with store.engine.begin() as conn:
            for tenant in f.tenants:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{tenant}" CASCADE'))


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # SQLite: plans hold the lock
def test_a_tenant_finished_while_another_runner_plans_is_never_dropped(store, fleet):
    from sqlalchemy import event, text

    f = fleet(4)
    stop = threading.Event()
    stop.set()  # plan only
    rollout(store, "finish-while-planning", f.tenants, f.migrate, stop=stop)
    plan = store._t().rollout_tenant
    finished = f.tenants[3]

    def another_runner_finishes(conn, cursor, statement, parameters, context, executemany):
        if "rollout_tenant SET status" in statement and "dropped" in str(parameters):
            with store.engine.begin() as other:  # commits before the drop runs
                other.execute(
                    text(f"UPDATE {plan.name} SET status = 'done' WHERE tenant = :t"), {"t": finished}
                )

    event.listen(store.engine, "before_cursor_execute", another_runner_finishes)
    try:
        report = rollout(store, "finish-while-planning", f.tenants[:2], f.migrate, stop=stop)
    finally:
        event.remove(store.engine, "before_cursor_execute", another_runner_finishes)
    assert report.dropped == (f.tenants[2],), report
    assert rollout_status(store, "finish-while-planning")["done"] == 1, "the finished tenant stays done"


def test_a_progress_callback_that_fails_stops_claiming_and_lets_open_windows_finish(store, fleet):
    f = fleet(12)
    calls = []

    def progress(p):
        calls.append(p)
        if len(calls) == 2:
            raise RuntimeError("the display broke")

    def slow(conn, tenant):
        time.sleep(0.3)  # 12 tenants on 2 windows: 1.8 s, the second progress call is due at 0.7 s
        f.migrate(conn, tenant)

    with pytest.raises(RuntimeError, match="the display broke"):
        rollout(store, "progress", f.tenants, slow, on_progress=progress, concurrency=2)
    status = rollout_status(store, "progress")
    assert status["running"] == 0 and status["failed"] == 0 and 0 < status["done"] < 12, status
    assert not any(store.get(t) and store.get(t).active for t in f.tenants), "no window left open"
    assert f.migrated() == dict.fromkeys(f.migrated(), 1)


def test_failed_tenants_a_run_leaves_out_are_dropped_not_retried_nor_counted(store, fleet):
    f = fleet(4)
    gone = f.tenants[0]
    first = rollout(store, "deleted", f.tenants[:1], lambda c, t: f.migrate(c, t, {gone}))
    assert set(first.failed) == {gone}
    second = rollout(store, "deleted", f.tenants[1:], f.migrate, retry_failed=True)  # gone was deleted
    assert second.complete and second.dropped == (gone,) and second.stopped is None, second
    assert set(f.migrated()) == set(f.tenants[1:]), "gone was not retried, and its failure spent no budget"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # SQLite: one runner at a time
def test_a_runs_tenants_that_another_runners_list_dropped_leave_it_incomplete(store, fleet):
    f = fleet(6)
    entered, release = threading.Event(), threading.Event()
    reports: dict[str, object] = {}

    def first_waits(conn, tenant):
        entered.set()
        release.wait(10)
        f.migrate(conn, tenant)

    def a() -> None:
        reports["a"] = rollout(store, "lists", f.tenants, first_waits, concurrency=1)

    runner = threading.Thread(target=a)
    runner.start()
    assert entered.wait(10)
    stop = threading.Event()
    stop.set()
    rollout(store, "lists", f.tenants[:3], f.migrate, stop=stop)  # B's list drops tenants 3-5
    release.set()
    runner.join(30)
    report = reports["a"]
    assert set(report.not_started) == set(f.tenants[3:]) and not report.complete, report


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_runner_whose_clock_runs_ahead_takes_over_no_live_claim(store, fleet):
    f = fleet(16)

    def slow(conn, tenant):
        time.sleep(0.2)
        f.migrate(conn, tenant)

    ahead = _runner(store, "skew", f, 0.2, 2, 3.0, "skew=40")  # 40 s ahead: every lease looks expired
    here = rollout(store, "skew", f.tenants, slow, concurrency=2, lease=3.0)
    out, err = ahead.communicate(timeout=120)
    assert ahead.returncode == 0, err[-2000:]
    assert here.failed == {} and int(out.split()[-1]) > 0 and len(here.done) > 0, (here, out)
    plan = store._t().rollout_tenant
    with store.engine.connect() as conn:
        attempts = dict(
            conn.execute(select(plan.c.tenant, plan.c.attempts).where(plan.c.name == "skew")).all()
        )
    assert attempts == dict.fromkeys(f.tenants, 1), "no claim was taken over while its runner was alive"
    assert f.migrated() == dict.fromkeys(f.tenants, 1)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_on_a_serializable_engine_the_rollouts_windows_run_read_committed(store, fleet):
    """Under a snapshot, windows of different tenants conflicted (predicate locks on the state
    table's index pages), and a migration longer than a third of the lease failed its done mark
    against the claim's renewal, at every attempt. The rollout's windows run in READ COMMITTED
    whatever the engine's level, and none fails."""
    from sqlalchemy import create_engine

    from maintgate import MaintenanceStore

    f = fleet(40)
    engine = create_engine(store.engine.url, isolation_level="SERIALIZABLE", pool_size=10)
    serial = MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state"))
    levels: set[str] = set()

    def migrate(conn, tenant: str) -> None:
        levels.add(conn.execute(text("SHOW transaction_isolation")).scalar())
        f.migrate(conn, tenant)

    try:
        report = rollout(serial, "serial", f.tenants, migrate, concurrency=4, max_failures=None)
        assert report.failed == {}, list(report.failed.values())[:2]
        assert report.complete and f.migrated() == dict.fromkeys(f.tenants, 1)
        assert levels == {"read committed"}
        assert not any(store.get(t).active for t in f.tenants)
        assert not any(e.error for t in f.tenants for e in store.history(t)), "no window failed"
    finally:
        engine.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_rollout_leaves_the_pools_connections_at_the_engines_level(store, fleet):
    """An engine whose sessions are made SERIALIZABLE by a connect event: the rollout's windows
    run READ COMMITTED, its claims in autocommit, and neither setting outlives them. Through
    SQLAlchemy's isolation option they did: the pool puts back the level it saw at the first
    connect (the server's), so every later transaction on those connections ran READ COMMITTED."""
    from sqlalchemy import create_engine, event

    from maintgate import MaintenanceStore, maintenance_window

    engine = create_engine(store.engine.url, pool_size=4, max_overflow=0)

    @event.listens_for(engine, "connect")
    def serializable(dbapi_connection, record) -> None:
        dbapi_connection.autocommit = True
        dbapi_connection.execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        dbapi_connection.autocommit = False

    def levels() -> list[str]:
        held = [engine.connect() for _ in range(4)]
        try:
            return [c.execute(text("SHOW transaction_isolation")).scalar() for c in held]
        finally:
            for c in held:
                c.close()

    serial = MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state"))
    f = fleet(6)
    inside: set[str] = set()

    def migrate(conn, tenant: str) -> None:
        inside.add(conn.execute(text("SHOW transaction_isolation")).scalar())
        f.migrate(conn, tenant)

    try:
        assert levels() == ["serializable"] * 4
        assert rollout(serial, "levels", f.tenants, migrate, concurrency=2).complete
        assert inside == {"read committed"}
        assert levels() == ["serializable"] * 4
        with maintenance_window(serial, "after") as conn:
            assert conn.execute(text("SHOW transaction_isolation")).scalar() == "serializable"
    finally:
        engine.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_windows_that_deadlock_are_run_again_not_failed(store, fleet):
    """Two migrations that lock the same two tables in opposite orders deadlock: PostgreSQL aborts
    one (40P01) and says to run it again, so the rollout does; both end migrated, once."""
    f = fleet(2)
    first, second = (f"contacts_{t}" for t in f.tenants)
    both_locked = threading.Barrier(2, timeout=10)
    attempts: list[str] = []

    def migrate(conn, tenant: str) -> None:
        mine, other = (first, second) if tenant == f.tenants[0] else (second, first)
        conn.execute(text(f"LOCK TABLE {mine} IN ACCESS EXCLUSIVE MODE"))
        attempts.append(tenant)
        if attempts.count(tenant) == 1:  # the first attempts meet, each holding its first table
            both_locked.wait()
        conn.execute(text(f"LOCK TABLE {other} IN ACCESS EXCLUSIVE MODE"))
        f.migrate(conn, tenant)

    report = rollout(store, "deadlock", f.tenants, migrate, concurrency=2, max_failures=None)
    assert report.failed == {} and sorted(report.done) == f.tenants
    assert f.migrated() == dict.fromkeys(f.tenants, 1)
    errors = [e.error for t in f.tenants for e in store.history(t) if e.error]
    assert any("deadlock" in e for e in errors), errors
    assert len(attempts) == 3, attempts


def test_a_rollout_never_changes_the_listeners_of_the_stores_engine(store, fleet):
    """Other threads iterate the engine's listeners on every statement: adding or removing one
    meanwhile fails their statements ("deque mutated during iteration")."""
    from sqlalchemy import event

    def mine(*args):
        pass

    event.listen(store.engine, "before_cursor_execute", mine)  # the app's own (tracing, logging)
    listeners = store.engine.dispatch.before_cursor_execute
    before = list(listeners)
    seen: list[list] = []
    f = fleet(3)

    def migrate(conn, tenant):
        f.migrate(conn, tenant)
        seen.append(list(listeners))

    try:
        assert rollout(store, "listeners", f.tenants, migrate).complete
        assert seen and all(now == before for now in seen)
        assert list(listeners) == before
    finally:
        event.remove(store.engine, "before_cursor_execute", mine)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # SQLite: one runner, one writer
@pytest.mark.parametrize("functions", [True, False], ids=["functions", "statements"])
def test_a_window_whose_claim_another_runner_took_rolls_back_and_is_not_marked_done(
    store, fleet, caplog, functions
):
    """The done mark is fenced on this runner's claim: a runner that stalled past its lease and
    lost the tenant to another must not mark it done, nor commit its migration. (The other
    runner here dies at once: its claim runs out in a second and the tenant is taken back.)"""
    if not functions:
        without_server_functions(store)
    f = fleet(3)
    taken = f.tenants[1]
    plan = store.tables.rollout_tenant.name
    attempts: list[str] = []

    def migrate(conn, tenant: str) -> None:
        f.migrate(conn, tenant)
        attempts.append(tenant)
        if attempts.count(taken) == 1 and tenant == taken:
            with store.engine.begin() as other:
                other.execute(
                    text(
                        f"UPDATE {plan} SET runner = 'another-runner', lease_until = now() + interval '1s'"
                        " WHERE name = 'fenced' AND tenant = :tenant"
                    ),
                    {"tenant": taken},
                )

    report = rollout(store, "fenced", f.tenants, migrate, concurrency=1)
    assert sorted(report.done) == f.tenants and report.failed == {}
    assert f.migrated() == dict.fromkeys(f.tenants, 1), "the first attempt rolled back; the retake committed"
    assert events(store, taken) == ["window_opened", "window_failed", "window_opened", "window_committed"]
    assert "taken over" in store.history(taken)[1].error
    assert not store.get(taken).active
    with store.engine.connect() as conn:
        tries = conn.execute(text(f"SELECT attempts FROM {plan} WHERE tenant = :t"), {"t": taken}).scalar()
    assert tries == 2 and attempts.count(taken) == 2
    assert "taken over by another runner" in caplog.text


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("how", ["a statement", "a server-side cursor", "the driver itself"])
def test_an_aborted_rollouts_open_window_runs_no_statement_after_the_abort(store, fleet, how):
    """Aborting fails the open windows at their next statement, even one the migration starts
    after the abort, between statements (a sequence, which no rollback undoes, shows it ran);
    streamed through a server-side cursor too, or sent by psycopg itself (helper's finding)."""
    f = fleet(1)
    sequence = f"{store.tables.state.name}_seq"
    with store.engine.begin() as conn:
        conn.execute(text(f"CREATE SEQUENCE {sequence}"))
    abort = threading.Event()

    def migrate(conn, tenant: str) -> None:
        f.migrate(conn, tenant)
        abort.set()
        time.sleep(0.6)  # the runner sees the abort (it looks every 0.2 s)
        statement = f"SELECT nextval('{sequence}')"
        if how == "a statement":
            conn.execute(text(statement))
        elif how == "a server-side cursor":
            conn.execution_options(stream_results=True).execute(text(statement)).all()
        else:
            conn.connection.driver_connection.execute(statement)

    try:
        report = rollout(store, "aborted", f.tenants, migrate, abort=abort)
        with store.engine.connect() as conn:
            ran = conn.execute(text(f"SELECT is_called FROM {sequence}")).scalar()
    finally:
        with store.engine.begin() as conn:
            conn.execute(text(f"DROP SEQUENCE {sequence}"))
    assert not ran, "the statement after the abort ran"
    assert "aborted" in report.failed[f.tenants[0]] and store.get(f.tenants[0]).active
    assert f.migrated() == {}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_window_closed_in_its_block_lends_no_abort_to_the_next_checkout(store, fleet):
    """Helper's finding: a migration that closes its connection hands it back to the pool while
    the window runs; another checkout of it must not carry the rollout's abort check."""
    f = fleet(1)
    abort, ran = threading.Event(), []

    def migrate(conn, tenant: str) -> None:
        conn.close()
        with store.engine.connect() as other:
            abort.set()
            time.sleep(0.6)  # the runner sees the abort (it looks every 0.2 s)
            ran.append(other.execute(text("SELECT 1")).scalar())

    report = rollout(store, "lent", f.tenants, migrate, abort=abort)
    assert ran == [1], "another checkout's statement was aborted"
    assert f.tenants[0] in report.failed and store.get(f.tenants[0]).active
