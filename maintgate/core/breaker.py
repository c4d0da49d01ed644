"""A circuit breaker for the store: after a failure, no request waits on the database again.

While it is open, loads fail at once (the gate answers by its outage policy) and one background
probe at a time tests the database, with exponential backoff; the first probe that succeeds
closes it, and the gate drops its cache so that everyone sees the current state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("maintgate")


class StoreUnavailable(Exception):
    """Raised instead of querying while the breaker is open."""


class CircuitBreaker:
    """Closed: queries go through. Open: they fail fast while a prober retries in the background."""

    def __init__(
        self,
        probe: Callable[[], object],
        on_recovery: Callable[[], None],
        *,
        base_delay: float = 0.25,
        max_delay: float = 2.0,
        probe_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe_timeout = probe_timeout
        self._probe = probe
        self._on_recovery = on_recovery
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.is_open = False
        self.opened_at: float | None = None
        self.failures = 0
        self._prober: threading.Thread | None = None
        self._stopped = False

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the background prober (the gate is closing)."""
        with self._lock:
            self._stopped = True
            prober = self._prober
        self._wake.set()
        if prober is not None and prober is not threading.current_thread():
            prober.join(timeout)

    def check(self) -> None:
        """Raise StoreUnavailable while open; cheap enough to call before every load."""
        if self.is_open:
            raise StoreUnavailable("the maintenance store is unreachable; a background probe retries it")

    def failed(self) -> None:
        """A load failed: open, and make sure one prober is at work."""
        with self._lock:
            self.failures += 1
            if not self.is_open:
                self.is_open = True
                self.opened_at = self._clock()
            if not self._stopped and (self._prober is None or not self._prober.is_alive()):
                self._prober = threading.Thread(target=self._run, name="maintgate-store-probe", daemon=True)
                self._prober.start()

    def _probe_with_timeout(self) -> None:
        """Run the probe in a thread of its own: a server that never answers must not stall the prober."""
        outcome: list[BaseException | None] = []

        def attempt() -> None:
            try:
                self._probe()
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=attempt, name="maintgate-store-probe-attempt", daemon=True)
        thread.start()
        thread.join(self.probe_timeout)
        if not outcome:
            raise TimeoutError(f"the store probe got no answer within {self.probe_timeout}s")
        if outcome[0] is not None:
            raise outcome[0]

    def _run(self) -> None:
        delay = self.base_delay
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            if self._stopped:
                return
            try:
                self._probe_with_timeout()
            except Exception as exc:
                delay = min(self.max_delay, delay * 2)
                logger.debug("maintgate: store probe failed (%s); next in %.2fs", type(exc).__name__, delay)
                continue
            with self._lock:
                self.is_open = False
                downtime = self._clock() - (self.opened_at or self._clock())
                self.opened_at = None
                self._prober = None
            logger.warning(
                "maintgate: the maintenance store is reachable again after %.1fs",
                downtime,
                extra={"maintgate_event": "store_recovered", "downtime": downtime},
            )
            self._on_recovery()
            return
