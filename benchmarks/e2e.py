"""End to end: throughput of a real uvicorn server under wrk on 127.0.0.1, bare vs wrapped by maintgate."""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import uuid

from maintgate import MaintenanceStore

from .servers import uvicorn_processes


def wrk(url: str, seconds: int) -> float:
    """Requests per second that wrk reached against ``url``."""
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", "-H", "X-Tenant-ID: demo", url + "/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    return float(match.group(1))


def run(url: str, quick: bool = False) -> dict[str, float] | None:
    """Median requests per second of each server over alternating rounds; None without wrk."""
    if shutil.which("wrk") is None:
        return None
    prefix = f"mgbench{uuid.uuid4().hex[:8]}_"
    store = MaintenanceStore(url, table_prefix=prefix)
    store.create_tables()
    seconds, rounds = (2, 2) if quick else (5, 3)
    base = {"MAINTGATE_BENCH_URL": url, "MAINTGATE_BENCH_PREFIX": prefix, "MAINTGATE_BENCH_TTL": "1.0"}
    try:
        with (
            uvicorn_processes(1, {**base, "MAINTGATE_BENCH_APP": "bare"}) as (bare,),
            uvicorn_processes(1, {**base, "MAINTGATE_BENCH_APP": "gated"}) as (gated,),
        ):
            wrk(bare, 1)
            wrk(gated, 1)
            bare_rates, gated_rates = [], []
            for _ in range(rounds):
                bare_rates.append(wrk(bare, seconds))
                gated_rates.append(wrk(gated, seconds))
    finally:
        store.drop_tables()
        store.engine.dispose()
    return {"bare": statistics.median(bare_rates), "maintgate": statistics.median(gated_rates)}
