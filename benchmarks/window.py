"""Migration window overhead on PostgreSQL: the window around a trivial migration vs the bare transaction."""

from __future__ import annotations

import statistics
import time
import uuid

from sqlalchemy import text

from maintgate import MaintenanceStore, maintenance_window


def run(url: str, quick: bool = False) -> dict[str, float]:
    """Median milliseconds of a bare transaction and of the same work inside a window."""
    store = MaintenanceStore(url, table_prefix=f"mgbench{uuid.uuid4().hex[:8]}_")
    store.create_tables()
    n = 10 if quick else 40
    bare, window = [], []
    try:
        for i in range(n + 3):
            start = time.perf_counter()
            with store.engine.begin() as conn:
                conn.execute(text("SELECT 1"))
            middle = time.perf_counter()
            with maintenance_window(store, "bench", message="benchmark") as conn:
                conn.execute(text("SELECT 1"))
            end = time.perf_counter()
            if i >= 3:  # warm-up
                bare.append((middle - start) * 1000)
                window.append((end - middle) * 1000)
    finally:
        store.drop_tables()
        store.engine.dispose()
    return {"bare": statistics.median(bare), "window": statistics.median(window)}
