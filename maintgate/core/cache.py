"""A bounded TTL cache of maintenance states with single-flight loading, for threads and asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Generic, TypeVar

from cachetools import LRUCache, TTLCache

from .errors import InvalidArgument

V = TypeVar("V")


class _Miss:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"


MISS: Any = _Miss()
"""Returned by :meth:`StateCache.peek` when the key is absent or stale."""


class _IndexedTTLCache(TTLCache):  # type: ignore[type-arg]
    """A TTLCache that drops keys from a plain-dict read index whenever it evicts them.

    TTLCache owns the bound, the expiry and the eviction order; the index only makes
    reads lock-free and cheap (a TTLCache read costs about 1.5 µs here, the index 0.1 µs).
    """

    def __init__(self, maxsize: int, ttl: float, timer: Callable[[], float], index: dict[Any, Any]) -> None:
        super().__init__(maxsize, ttl, timer)
        self._index = index

    def popitem(self) -> tuple[Any, Any]:
        key, value = super().popitem()
        self._index.pop(key, None)
        return key, value

    def expire(self, time: float | None = None) -> list[tuple[Any, Any]]:
        expired = super().expire(time)
        for key, _ in expired:
            self._index.pop(key, None)
        return expired


class StateCache(Generic[V]):
    """Caches loaded values for ``ttl`` seconds, at most ``maxsize`` keys, one load per key at a time.

    ``loader(key)`` returns ``(value, max_age)``: ``max_age`` (seconds, or None) shortens the
    entry's life when the value is known to change sooner, at a schedule boundary say.
    A failing load falls back to the last value loaded for that key (or ``default``)
    and caches that too, so an outage costs one failing query per key per TTL.
    """

    def __init__(
        self,
        loader: Callable[[Hashable], tuple[V, float | None]],
        *,
        ttl: float = 1.0,
        maxsize: int = 10_000,
        timer: Callable[[], float] = time.monotonic,
        default: V | None = None,
        on_error: Callable[[Hashable, BaseException], None] | None = None,
        max_workers: int = 8,
        load_timeout: float | None = 5.0,
        fallback: Callable[[Hashable, Any], V] | None = None,
    ) -> None:
        if not ttl > 0:
            raise InvalidArgument(f"cache ttl must be > 0 seconds, got {ttl!r}")
        if not isinstance(maxsize, int) or maxsize < 1:
            raise InvalidArgument(f"cache maxsize must be a positive int, got {maxsize!r}")
        self.ttl = float(ttl)
        self.maxsize = maxsize
        self._loader = loader
        self._timer = timer
        self._default = default
        self._on_error = on_error
        self._max_workers = max_workers
        self.max_pending = max(64, 16 * max_workers)
        self.load_timeout = load_timeout
        self._fallback = fallback
        self._generation = 0
        self._index: dict[Hashable, tuple[float, V]] = {}
        self._store = _IndexedTTLCache(maxsize, self.ttl, timer, self._index)
        self._last_known: LRUCache[Hashable, V] = LRUCache(maxsize)
        self._inflight: dict[Hashable, Future[V]] = {}
        self._lock = threading.Lock()
        self._executor: _DaemonPool | None = None

    def __len__(self) -> int:
        return len(self._index)

    def peek(self, key: Hashable) -> V:
        """The fresh cached value for ``key``, or ``MISS``; takes no lock and does no I/O."""
        entry = self._index.get(key)
        if entry is not None and entry[0] > self._timer():
            return entry[1]
        return MISS  # type: ignore[no-any-return]

    def load(self, key: Hashable) -> V:
        """The value for ``key``; a load runs in a worker thread, once however many threads wait.

        The caller waits at most ``load_timeout``, then gets the fallback value (not cached):
        a database that stops answering mid-query can hold a worker, never a request.
        """
        fut, generation = self._claim(key)
        if generation is not None:
            self._submit(key, fut, generation)
        try:
            return fut.result(timeout=self.load_timeout)
        except FutureTimeout:
            return self._gave_up(key, fut)

    async def load_async(self, key: Hashable) -> V:
        """The value for ``key``; a load runs in a worker thread, once however many tasks wait."""
        fut, generation = self._claim(key)
        if generation is not None:
            self._submit(key, fut, generation)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.load_timeout)
        except TimeoutError:
            return self._gave_up(key, fut)

    def invalidate(self, key: Hashable | None = None) -> None:
        """Forget ``key``, or every key; loads already running are not cached when they end."""
        with self._lock:
            self._generation += 1
            if key is None:
                self._store.clear()
                self._index.clear()
                self._inflight.clear()
            else:
                self._store.pop(key, None)
                self._index.pop(key, None)
                self._inflight.pop(key, None)

    def put(self, key: Hashable, value: V) -> None:
        """Cache ``value`` for ``key`` now, as its last known value too; running loads are dropped."""
        with self._lock:
            self._generation += 1
            self._inflight.pop(key, None)
            self._last_known[key] = value
            self._store[key] = value
            self._index[key] = (self._timer() + self.ttl, value)

    def close(self) -> None:
        """Stop the worker threads used by :meth:`load_async`."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    def _claim(self, key: Hashable) -> tuple[Future[V], int | None]:
        """The future to wait on, and the cache generation when this caller must run the load."""
        with self._lock:
            value = self.peek(key)
            if value is not MISS:
                done: Future[V] = Future()
                done.set_result(value)
                return done, None
            fut = self._inflight.get(key)
            if fut is not None:
                return fut, None
            fut = self._inflight[key] = Future()
            # A running future cannot be cancelled, so one waiter giving up cannot fail the others.
            fut.set_running_or_notify_cancel()
            return fut, self._generation

    def _submit(self, key: Hashable, fut: Future[V], generation: int) -> None:
        """Hand a claimed load to the bounded worker pool; never leave the claim dangling."""
        if len(self._inflight) > self.max_pending:
            self._settle(key, fut, generation, None, TimeoutError("too many loads waiting"))
            return
        try:
            self._pool().submit(self._fill, key, fut, generation)
        except BaseException as exc:  # the pool is shut down
            self._settle(key, fut, generation, None, exc)

    def _fill(self, key: Hashable, fut: Future[V], generation: int) -> None:
        try:
            loaded = self._loader(key)
        except Exception as exc:
            self._settle(key, fut, generation, None, exc)
        except BaseException as exc:
            with self._lock:
                if self._inflight.get(key) is fut:
                    del self._inflight[key]
            fut.set_exception(exc)
            raise
        else:
            self._settle(key, fut, generation, loaded, None)

    def _settle(
        self,
        key: Hashable,
        fut: Future[V],
        generation: int,
        loaded: tuple[V, float | None] | None,
        error: BaseException | None,
    ) -> None:
        """Cache a load's result (or the fallback after ``error``) unless invalidated meanwhile."""
        if error is not None and self._on_error is not None:
            self._on_error(key, error)
        with self._lock:
            if loaded is None:
                value, max_age = self._fallback_for(key), None
            else:
                value, max_age = loaded
                self._last_known[key] = value
            if generation == self._generation:
                life = self.ttl if max_age is None else max(0.0, min(self.ttl, max_age))
                self._store[key] = value
                self._index[key] = (self._timer() + life, value)
            if self._inflight.get(key) is fut:
                del self._inflight[key]
        fut.set_result(value)

    def _gave_up(self, key: Hashable, fut: Future[V]) -> V:
        if self._on_error is not None:
            self._on_error(key, TimeoutError(f"loading the state took longer than {self.load_timeout}s"))
        with self._lock:
            if self._inflight.get(key) is fut:
                del self._inflight[key]  # a stuck load must not hold later requests: they start afresh
            return self._fallback_for(key)

    def _fallback_for(self, key: Hashable) -> V:
        """What a failed or abandoned load answers: the policy's choice, by default the last known value."""
        last = self._last_known.get(key, MISS)
        if self._fallback is not None:
            return self._fallback(key, last)
        return self._default if last is MISS else last  # type: ignore[return-value]

    def _pool(self) -> _DaemonPool:
        with self._lock:
            if self._executor is None:
                self._executor = _DaemonPool(self._max_workers)
            return self._executor


_Task = tuple[Callable[..., object], tuple[object, ...]]


class _DaemonPool:
    """A fixed set of daemon worker threads.

    Unlike ThreadPoolExecutor, whose threads the interpreter joins at exit, a worker stuck on a
    database that stopped answering cannot keep a server process from shutting down.
    """

    def __init__(self, workers: int) -> None:
        self._tasks: queue.SimpleQueue[tuple[Callable[..., object], tuple[object, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        for n in range(workers):
            threading.Thread(target=self._work, name=f"maintgate-load-{n}", daemon=True).start()
        self._workers = workers

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        if self._closed:
            raise RuntimeError("the load pool is shut down")
        self._tasks.put((fn, args))

    def shutdown(self, wait: bool = False) -> None:
        self._closed = True
        for _ in range(self._workers):
            self._tasks.put(None)

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            fn, args = task
            with contextlib.suppress(BaseException):  # _fill settles its own future
                fn(*args)
