"""Fleet rollout on PostgreSQL: 1,000 tenants, each with a table of its own and a one-statement migration.

Every row migrates the same 1,000 tables with the same statement (``ALTER TABLE … ADD COLUMN``,
a column of its own per row), so rows differ only in how the migrations are run:

- a bare loop: each migration in a plain transaction, one after the other (and on 8 threads,
  which shows where the database itself becomes the limit);
- a loop of migration windows (what a user writes without ``rollout``), one after the other;
- ``maintgate.rollout`` at concurrency 1, 4 and 8, and two runner processes (4 each) sharing
  one plan;
- ``maintgate.rollout`` at concurrency 1 with 100,000 tenants in the plan, stopped after the
  first 1,000: the cost of claiming a tenant does not grow with the plan.

The overhead per tenant is the time per tenant minus the bare loop's, measured in this one run.
The bare loop, the loop of windows and the rollout at concurrency 1 run in turn, three rounds
of each, and each row is its median round: on a shared machine the speed drifts between rows
by more than the differences measured.
``python -m benchmarks.rollout [--quick]`` runs this section alone;
``python -m benchmarks.rollout --runner …`` is the runner process the two-runner row starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Connection, text

from maintgate import MaintenanceStore, maintenance_window, rollout

TENANTS = 1_000
BIG_PLAN = 100_000
ROUNDS = 3


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median time, with every run's time (``rounds``)."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return ordered[len(ordered) // 2] | {"rounds": [r["seconds"] for r in runs]}


def _tenants(tag: str, count: int) -> list[str]:
    return [f"rb{tag}{i:06d}" for i in range(count)]


def _migration(column: str, stamps: list[float]) -> Any:
    def migrate(conn: Connection, tenant: str) -> None:
        conn.execute(text(f"ALTER TABLE {tenant} ADD COLUMN {column} TEXT"))
        stamps.append(time.perf_counter())

    return migrate


def _machine_busy() -> float:
    """Seconds of CPU this machine's processes have used since boot, all cores (Linux)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _runner(argv: list[str]) -> int:
    """One runner process of the two-runner row; prints its start and end (wall clock) as JSON."""
    url, prefix, name, tag, count, concurrency, column = argv
    store = MaintenanceStore(url, table_prefix=prefix)
    tenants = _tenants(tag, int(count))
    stamps: list[float] = []
    start, cpu = time.time(), time.process_time()
    report = rollout(store, name, tenants, _migration(column, stamps), concurrency=int(concurrency))
    end, cpu = time.time(), time.process_time() - cpu
    store.engine.dispose()
    print(json.dumps({"start": start, "end": end, "done": len(report.done), "cpu": cpu}))
    return 0


def run(url: str, quick: bool = False) -> dict[str, Any]:
    """Seconds per row, tenants per second, and the overhead per tenant against the bare loop."""
    count = 200 if quick else TENANTS
    tag = uuid.uuid4().hex[:6]
    prefix = f"rb{tag}_"
    store = MaintenanceStore(url, table_prefix=prefix)
    store.create_tables()
    tenants = _tenants(tag, count)
    with store.engine.begin() as conn:
        for tenant in tenants:
            conn.execute(text(f"CREATE TABLE {tenant} (id INTEGER, email TEXT)"))
    rows: list[dict[str, Any]] = []
    columns = iter(f"c{i}" for i in range(100))

    def measured(action: Any) -> dict[str, Any]:
        """Run ``action``: its wall time, this process's CPU and every process's, in cores."""
        start, cpu, busy = time.perf_counter(), time.process_time(), _machine_busy()
        done = action()
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "done": done,
            "cpu": (time.process_time() - cpu) / seconds,  # this process's CPU while the row ran
            "machine": (_machine_busy() - busy) / seconds,  # every process's (PostgreSQL's too)
        }

    def row(label: str, concurrency: int, **measured: Any) -> None:
        rows.append({"label": label, "concurrency": concurrency, **measured})

    def bare_loop() -> int:
        migrate = _migration(next(columns), [])
        for tenant in tenants:
            with store.engine.begin() as conn:
                migrate(conn, tenant)
        return count

    def window_loop() -> int:
        migrate = _migration(next(columns), [])
        for tenant in tenants:
            with maintenance_window(store, tenant) as conn:
                migrate(conn, tenant)
        return count

    def rolled_out(name: str, concurrency: int) -> Any:
        def action() -> int:
            migrate = _migration(next(columns), [])
            return len(rollout(store, name, tenants, migrate, concurrency=concurrency).done)

        return action

    try:
        # The rows the overhead at concurrency 1 is read from, in interleaved rounds: this
        # machine's speed drifts from one row to the next (a shared VM), so each is the median
        # of ROUNDS runs, taken in turn.
        rounds: dict[str, list[dict[str, Any]]] = {"bare loop": [], "loop of windows": [], "rollout": []}
        for i in range(1 if quick else ROUNDS):
            rounds["bare loop"].append(measured(bare_loop))
            rounds["loop of windows"].append(measured(window_loop))
            rounds["rollout"].append(measured(rolled_out(f"c1-{i}", 1)))
        medians = {label: _median(runs) for label, runs in rounds.items()}
        row("bare loop", 1, **medians["bare loop"])

        # Bare, on 8 threads: where plain transactions meet the database's limit.
        migrate = _migration(next(columns), [])

        def bare(tenant: str) -> None:
            with store.engine.begin() as conn:
                migrate(conn, tenant)

        def threaded() -> int:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(bare, tenants))
            return count

        row("bare, 8 threads", 8, **measured(threaded))
        # A loop of windows: the window's own cost, without the rollout's.
        row("loop of windows", 1, **medians["loop of windows"])
        row("rollout", 1, **medians["rollout"])
        for concurrency in (4, 8):
            row("rollout", concurrency, **measured(rolled_out(f"c{concurrency}", concurrency)))

        column = next(columns)
        command = [sys.executable, "-m", "benchmarks.rollout", "--runner"]
        args = [url, prefix, "two", tag, str(count), "4", column]
        busy, launched = _machine_busy(), time.time()
        runners = [subprocess.Popen([*command, *args], stdout=subprocess.PIPE, text=True) for _ in range(2)]
        results = [json.loads(r.communicate(timeout=600)[0]) for r in runners]
        seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
        # The machine's CPU over the whole time the processes ran: their start-up is CPU too.
        busy_over = time.time() - launched
        row(
            "rollout, 2 processes",
            8,
            seconds=seconds,
            done=sum(r["done"] for r in results),
            split=[r["done"] for r in results],
            cpu=sum(r["cpu"] for r in results) / seconds,
            machine=(_machine_busy() - busy) / busy_over,
        )

        # 100,000 tenants in the plan (those past the first `count` have no table: never reached).
        big = _tenants(tag, count) + _tenants(f"x{tag[:5]}", BIG_PLAN - count)
        stamps: list[float] = []
        stop = threading.Event()
        inner = _migration(next(columns), stamps)

        def stopping(conn: Connection, tenant: str) -> None:
            inner(conn, tenant)
            if len(stamps) == count:
                stop.set()

        big_run = measured(
            lambda: len(rollout(store, "big-plan", big, stopping, concurrency=1, stop=stop).done)
        )
        # Time per tenant from the first window's work to the last's: the plan's creation left out.
        steady = (stamps[-1] - stamps[0]) / (len(stamps) - 1) * count
        big_run |= {"seconds": steady, "total": big_run["seconds"]}
        row(f"rollout, {BIG_PLAN:,} in plan", 1, **big_run)
    finally:
        with store.engine.begin() as conn:
            for tenant in tenants:
                conn.execute(text(f"DROP TABLE IF EXISTS {tenant}"))
        store.drop_tables()
        store.engine.dispose()
    return {"tenants": count, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--runner"]:
        return _runner(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rollout", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    from benchmarks.__main__ import POSTGRES_URL, Table, _rollout_section

    table = Table()
    _rollout_section(run(POSTGRES_URL, quick=args.quick), table)
    return 1 if table.missed else 0


if __name__ == "__main__":
    sys.exit(main())
