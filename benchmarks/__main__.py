"""Run every benchmark and print one table: ``python -m benchmarks [--quick]``."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

from maintgate import MaintenanceStore

from . import hot_path, queries


def _us(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e6:.2f}µs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tenth of the iterations (a smoke run)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        store = MaintenanceStore(f"sqlite:///{os.path.join(tmp, 'bench.db')}")
        store.create_tables()
        machine = f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs"
        print(f"maintgate benchmarks — {machine}")
        print()
        print("Hot path, in process, maintenance off, cache hit (median per request, interleaved rounds)")
        print(
            f"{'target':<24}{'bare':>10}{'pass-thru':>11}{'floor':>10}{'maintgate':>11}"
            f"{'added':>10}{'ratio':>8}  target"
        )
        failures = 0
        for row in hot_path.run(store, quick=args.quick):
            bare, passed, gated = row["bare"], row["pass"], row["maintgate"]
            added_us = (gated - bare) * 1e6
            ratio = gated / bare
            if row["target"].startswith("bare"):
                goal, ok = "≤ 1 µs added", added_us <= 1.0
            else:
                goal, ok = "≤ 1.05×", ratio <= 1.05
            failures += not ok
            print(
                f"{row['target']:<24}{bare * 1e6:>8.2f}µs{passed * 1e6:>9.2f}µs{_us(row.get('floor')):>10}"
                f"{gated * 1e6:>9.2f}µs"
                f"{added_us:>8.2f}µs{ratio:>7.3f}×  {goal} {'ok' if ok else 'MISSED'}"
            )
        print()
        q = queries.run(store)
        print("Database load (SELECTs issued by the gate, TTL longer than the run)")
        ok = q["queries"] == q["tenants"]
        failures += not ok
        verdict = "ok" if ok else "MISSED"
        print(
            f"  {q['requests']:,} requests over {q['tenants']} tenants: {q['queries']} queries"
            f"  (target {q['tenants']}) {verdict}"
        )
        ok = q["stampede_queries"] == 1
        failures += not ok
        verdict = "ok" if ok else "MISSED"
        print(
            f"  {q['stampede']} concurrent cold requests to one tenant: {q['stampede_queries']} query"
            f"  (target 1) {verdict}"
        )
        store.engine.dispose()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
