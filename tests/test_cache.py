"""The state cache: TTL, bound, single flight (threads and asyncio), fallback on load errors."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from maintgate.core.cache import MISS, StateCache
from tests.conftest import ManualClock


class Loader:
    """A loader that counts calls and can be held back or made to fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()
        self.release.set()
        self.fail = False
        self.value: object = "v1"

    def __call__(self, key):
        self.calls += 1
        self.release.wait(5)
        if self.fail:
            raise ConnectionError("database is down")
        return self.value, None


def test_values_expire_after_ttl(clock: ManualClock):
    loader = Loader()
    cache = StateCache(loader, ttl=1.0, timer=clock)
    assert cache.peek("a") is MISS
    assert cache.load("a") == "v1"
    loader.value = "v2"
    clock.advance(0.99)
    assert cache.peek("a") == "v1"
    assert cache.load("a") == "v1" and loader.calls == 1
    clock.advance(0.02)
    assert cache.peek("a") is MISS
    assert cache.load("a") == "v2" and loader.calls == 2


def test_none_is_cached_too(clock: ManualClock):
    loader = Loader()
    loader.value = None
    cache = StateCache(loader, ttl=1.0, timer=clock)
    assert cache.load("a") is None
    assert cache.peek("a") is None
    cache.load("a")
    assert loader.calls == 1


def test_cache_is_bounded(clock: ManualClock):
    cache = StateCache(lambda key: (key, None), ttl=60, maxsize=100, timer=clock)
    for i in range(10_000):
        cache.load(f"t{i}")
    assert len(cache) == 100
    assert len(cache._store) == 100 and len(cache._last_known) == 100
    assert cache.peek("t9999") == "t9999"
    assert cache.peek("t0") is MISS


def test_expired_entries_leave_the_index(clock: ManualClock):
    cache = StateCache(lambda key: (key, None), ttl=1, maxsize=100, timer=clock)
    for i in range(50):
        cache.load(f"t{i}")
    clock.advance(2)
    cache.load("fresh")
    assert len(cache) == 1


def test_invalidate(clock: ManualClock):
    loader = Loader()
    cache = StateCache(loader, ttl=60, timer=clock)
    cache.load("a")
    cache.load("b")
    cache.invalidate("a")
    assert cache.peek("a") is MISS and cache.peek("b") == "v1"
    cache.invalidate()
    assert cache.peek("b") is MISS and len(cache) == 0


def test_threads_share_one_load_per_key():
    loader = Loader()
    loader.release.clear()
    cache = StateCache(loader, ttl=60)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.load("a"))) for _ in range(32)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    loader.release.set()
    for t in threads:
        t.join(5)
    assert results == ["v1"] * 32
    assert loader.calls == 1


def test_async_waiters_share_one_load_and_the_loop_stays_free():
    loader = Loader()
    loader.release.clear()
    cache = StateCache(loader, ttl=60)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while not loader.release.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    async def main():
        waiters = [asyncio.create_task(cache.load_async("a")) for _ in range(64)]
        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.1)
        loader.release.set()
        results = await asyncio.gather(*waiters)
        await tick
        return results

    assert asyncio.run(main()) == ["v1"] * 64
    assert loader.calls == 1
    assert ticks >= 5, "the event loop was blocked while the load ran"
    cache.close()


def test_a_cancelled_waiter_does_not_fail_the_others():
    loader = Loader()
    loader.release.clear()
    cache = StateCache(loader, ttl=60)

    async def main():
        first = asyncio.create_task(cache.load_async("a"))
        second = asyncio.create_task(cache.load_async("a"))
        await asyncio.sleep(0.05)
        first.cancel()
        loader.release.set()
        return await second

    assert asyncio.run(main()) == "v1"
    cache.close()


def test_failed_load_falls_back_to_last_known_then_default(clock: ManualClock):
    errors = []
    loader = Loader()
    cache = StateCache(loader, ttl=1, timer=clock, default="fallback", on_error=lambda k, e: errors.append(k))
    assert cache.load("a") == "v1"
    loader.fail = True
    clock.advance(2)
    assert cache.load("a") == "v1"
    assert cache.load("never-seen") == "fallback"
    assert errors == ["a", "never-seen"]
    calls = loader.calls
    assert cache.load("a") == "v1" and loader.calls == calls, "a failure is cached for the TTL"
    loader.fail = False
    loader.value = "v3"
    clock.advance(2)
    assert cache.load("a") == "v3"


def test_configuration_is_validated():
    with pytest.raises(ValueError, match="ttl"):
        StateCache(lambda k: (None, None), ttl=0)
    with pytest.raises(ValueError, match="maxsize"):
        StateCache(lambda k: (None, None), maxsize=0)


def test_max_age_shortens_an_entry(clock: ManualClock):
    cache = StateCache(lambda key: ("soon", 0.25), ttl=1.0, timer=clock)
    cache.load("a")
    clock.advance(0.2)
    assert cache.peek("a") == "soon"
    clock.advance(0.1)
    assert cache.peek("a") is MISS
