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

    cpu = [time.process_time()]
    machine = [_machine_busy()]

    def row(label: str, concurrency: int, seconds: float, done: int, **extra: Any) -> None:
        used, cpu[0] = time.process_time() - cpu[0], time.process_time()
        busy, machine[0] = _machine_busy() - machine[0], _machine_busy()
        extra.setdefault("cpu", used / seconds)  # this process's CPU, in cores, while the row ran
        extra["machine"] = busy / seconds  # every process's (PostgreSQL's too), in cores
        rows.append({"label": label, "concurrency": concurrency, "seconds": seconds, "done": done, **extra})

    try:
        # Bare loop, one at a time.
        migrate = _migration(next(columns), [])
        start, cpu[0], machine[0] = time.perf_counter(), time.process_time(), _machine_busy()
        for tenant in tenants:
            with store.engine.begin() as conn:
                migrate(conn, tenant)
        row("bare loop", 1, time.perf_counter() - start, count)

        # Bare, on 8 threads: where plain transactions meet the database's limit.
        migrate = _migration(next(columns), [])

        def bare(tenant: str) -> None:
            with store.engine.begin() as conn:
                migrate(conn, tenant)

        start, cpu[0], machine[0] = time.perf_counter(), time.process_time(), _machine_busy()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(bare, tenants))
        row("bare, 8 threads", 8, time.perf_counter() - start, count)

        # A loop of windows: the window's own cost, without the rollout's.
        migrate = _migration(next(columns), [])
        start, cpu[0], machine[0] = time.perf_counter(), time.process_time(), _machine_busy()
        for tenant in tenants:
            with maintenance_window(store, tenant) as conn:
                migrate(conn, tenant)
        row("loop of windows", 1, time.perf_counter() - start, count)

        for concurrency in (1, 4, 8):
            migrate = _migration(next(columns), [])
            start, cpu[0], machine[0] = time.perf_counter(), time.process_time(), _machine_busy()
            report = rollout(store, f"c{concurrency}", tenants, migrate, concurrency=concurrency)
            row("rollout", concurrency, time.perf_counter() - start, len(report.done))

        column = next(columns)
        command = [sys.executable, "-m", "benchmarks.rollout", "--runner"]
        args = [url, prefix, "two", tag, str(count), "4", column]
        runners = [subprocess.Popen([*command, *args], stdout=subprocess.PIPE, text=True) for _ in range(2)]
        results = [json.loads(r.communicate(timeout=600)[0]) for r in runners]
        seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
        row(
            "rollout, 2 processes",
            8,
            seconds,
            sum(r["done"] for r in results),
            split=[r["done"] for r in results],
            cpu=sum(r["cpu"] for r in results) / seconds,
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

        start, cpu[0], machine[0] = time.perf_counter(), time.process_time(), _machine_busy()
        report = rollout(store, "big-plan", big, stopping, concurrency=1, stop=stop)
        total = time.perf_counter() - start
        # Time per tenant from the first window's work to the last's: the plan's creation left out.
        steady = (stamps[-1] - stamps[0]) / (len(stamps) - 1) * count
        row(f"rollout, {BIG_PLAN:,} in plan", 1, steady, len(report.done), total=total)
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
