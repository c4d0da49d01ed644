"""Propagation: how long after a commit every worker process answers with the new state.

Four uvicorn processes serve one PostgreSQL database over real HTTP on 127.0.0.1. A tenant is
flipped on and off; after each commit, one thread per worker polls it until it answers with
the new state. The figure for a flip is the slowest worker's.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid

import httpx2 as httpx

from maintgate import MaintenanceStore

from .servers import uvicorn_processes


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure(url: str, *, notify: bool, flips: int, workers: int = 4, ttl: float = 1.0) -> list[float]:
    """Milliseconds from commit to the last worker seeing it, one figure per flip."""
    prefix = f"mgbench{uuid.uuid4().hex[:8]}_"
    store = MaintenanceStore(url, table_prefix=prefix)
    store.create_tables()
    env = {
        "MAINTGATE_BENCH_APP": "gated",
        "MAINTGATE_BENCH_URL": url,
        "MAINTGATE_BENCH_PREFIX": prefix,
        "MAINTGATE_BENCH_NOTIFY": "1" if notify else "0",
        "MAINTGATE_BENCH_TTL": str(ttl),
    }
    results: list[float] = []
    try:
        with uvicorn_processes(workers, env) as urls:
            clients = [httpx.Client(base_url=u, headers={"X-Tenant-ID": "flip"}, timeout=5) for u in urls]
            for client in clients:
                client.get("/")  # the first miss starts each worker's listener
            time.sleep(1.5)
            for flip in range(flips):
                want = 503 if flip % 2 == 0 else 200
                seen = [0.0] * len(clients)

                def poll(i: int, client: httpx.Client, want: int = want, seen: list[float] = seen) -> None:
                    deadline = time.perf_counter() + ttl + 5
                    while time.perf_counter() < deadline:
                        if client.get("/").status_code == want:
                            seen[i] = time.perf_counter()
                            return
                    seen[i] = float("inf")

                if want == 503:
                    store.activate("flip")
                else:
                    store.deactivate("flip")
                committed = time.perf_counter()
                threads = [threading.Thread(target=poll, args=(i, c)) for i, c in enumerate(clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                results.append((max(seen) - committed) * 1000)
                time.sleep(random.uniform(0.02, 0.1))
            for client in clients:
                client.close()
    finally:
        store.drop_tables()
        store.engine.dispose()
    return results


def run(url: str, quick: bool = False) -> dict[str, dict[str, float]]:
    """p50 and p99, in ms, with notifications and with the TTL alone."""
    flips = 10 if quick else 50
    out = {}
    for mode, notify in (("notify", True), ("ttl", False)):
        values = measure(url, notify=notify, flips=flips)
        out[mode] = {
            "p50": statistics.median(values),
            "p99": percentile(values, 99),
            "max": max(values),
            "flips": len(values),
        }
    return out
