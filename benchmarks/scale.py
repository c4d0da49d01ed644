"""The gate at scale: 4 uvicorn workers on PostgreSQL under a fixed offered rate, 10 to 100,000 tenants.

Each row starts 4 fresh single-worker uvicorn processes (``benchmarks.scale:make_app``, a bare
ASGI hello-world behind ``MaintenanceMiddleware``, tenant from ``X-Tenant-ID``, TTL 1 s,
maintenance off) on a database created for the run, and loads them from a separate process
with an open-loop client: requests are scheduled at a constant rate, the tenant drawn uniformly
per request, and each latency is measured from the request's *scheduled* time, so a server
that falls behind pays for the requests queued behind it (no coordinated omission).

Lookups per second are read from PostgreSQL's own statistics: ``xact_commit + xact_rollback``
of the run's database in ``pg_stat_database`` and ``seq_scan + idx_scan`` of the state table,
sampled every 0.1 s over the measured interval. PostgreSQL 15 flushes a backend's counters at
most about once a second, so the figure is the Theil-Sen slope of the counter over the interval
(the median of the slopes between samples at least 1 s apart: a flush step landing early or late
barely moves it), after removing the sampler's own transactions (each sample is one transaction,
flushed at its end with ``pg_stat_force_next_flush()``). Checked against ``log_statement = all``
on the reference machine: 8.0-8.3 over five runs for a true 8.0 transactions per second, +2.4% at
about 1,600 per second. Autovacuum's visits to the database (one every ``autovacuum_naptime``
divided by the number of databases) count too, a transaction or two each.

The outage rows put a TCP proxy between the workers and PostgreSQL, warm 10 tenants (one in
maintenance), then refuse or black-hole the database (connections reset, then new ones refused,
or accepted and never answered) and keep the same load going, with 5% of requests for tenants
never seen; the latency figures are those of the tenants whose state is known.

``python -m benchmarks.scale [--quick] [--rate N] [--json]`` runs this section alone;
``python -m benchmarks.scale --client ...`` is the load generator the section starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

from tests.tcp_proxy import TCPProxy  # the one the outage tests use

WORKERS = 4
TTL = 1.0
# Offered requests per second. On the 2-CPU reference machine the 10-tenant row holds 3,000 with half
# the machine idle (p99 about 7 ms); 4,000 still holds (70% busy), 5,000-6,000 near saturation.
RATE = 3000
TENANTS = (10, 1_000, 10_000, 100_000)
CONNECTIONS = 16  # keep-alive connections per worker
OUTAGE_TENANTS = 10  # outage rows: tenants whose state the workers hold, one in maintenance
UNKNOWN_SHARE = 0.05  # outage rows: requests for tenants never seen
PREFIX = "maintgate_"
STATE_TABLE = f"{PREFIX}state"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the app the workers serve ------------------------------------------------------------------


async def hello(scope, receive, send) -> None:
    """A bare ASGI hello-world (with a lifespan, which the gate watches for shutdown)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")],
        }
    )
    await send({"type": "http.response.body", "body": b"Hello, world!"})


def make_app():
    """``uvicorn --factory benchmarks.scale:make_app``: the hello-world behind the gate, configured by env."""
    from maintgate import MaintenanceMiddleware, MaintenanceStore
    from maintgate.tenants import from_header

    store = MaintenanceStore(
        os.environ["MAINTGATE_BENCH_URL"], table_prefix=os.environ.get("MAINTGATE_BENCH_PREFIX", PREFIX)
    )
    return MaintenanceMiddleware(
        hello,
        store,
        tenant=from_header("X-Tenant-ID"),
        cache_ttl=float(os.environ.get("MAINTGATE_BENCH_TTL", "1.0")),
    )


# --- the open-loop client (its own process) ------------------------------------------------------


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.job: tuple[float, int, bytes] | None = None
        self.buf = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, job: tuple[float, int, bytes]) -> None:
        self.job = job
        self.transport.write(job[2])  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                total = end + 4 + int(head[at + 17 : stop if stop >= 0 else len(head)])
            elif b"chunked" in head:
                last = buf.find(b"\n0\r\n\r\n", end + 3)
                if last < 0:
                    break
                total = last + 6
            else:
                total = end + 4
            if len(buf) < total:
                break
            status = int(buf[9:12])
            buf = buf[total:]
            self.upstream.done(self, status)
        self.buf = buf

    def connection_lost(self, exc) -> None:
        self.upstream.lost(self)


class _Upstream:
    """A pool of connections to one worker, with a FIFO of requests waiting for a free one."""

    def __init__(self, port: int, client: _Client) -> None:
        self.port = port
        self.client = client
        self.conns: set[_Conn] = set()
        self.idle: deque[_Conn] = deque()
        self.waiting: deque[tuple[float, int, bytes]] = deque()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Conn(self), "127.0.0.1", self.port)
        self.conns.add(conn)
        self.ready(conn)

    def submit(self, job: tuple[float, int, bytes]) -> None:
        if self.idle:
            self.idle.popleft().send(job)
        else:
            self.waiting.append(job)

    def ready(self, conn: _Conn) -> None:
        if self.waiting:
            conn.send(self.waiting.popleft())
        else:
            self.idle.append(conn)  # FIFO: every connection stays in use, none idles into a timeout

    def done(self, conn: _Conn, status: int) -> None:
        scheduled, kind, _ = conn.job  # type: ignore[misc]
        conn.job = None
        self.client.records.append((scheduled, time.monotonic(), status, kind))
        self.ready(conn)

    def lost(self, conn: _Conn) -> None:
        if conn.job is not None:
            scheduled, kind, _ = conn.job
            conn.job = None
            self.client.records.append((scheduled, time.monotonic(), 0, kind))  # 0: connection error
        self.conns.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if not self.client.closing:
            self.client.spawn(self.connect())


class _Client:
    def __init__(self, ports: list[int]) -> None:
        self.records: list[tuple[float, float, int, int]] = []
        self.closing = False
        self.upstreams = [_Upstream(port, self) for port in ports]
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _request(tenant: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Tenant-ID: {tenant}\r\n\r\n".encode()


async def _drive(args: argparse.Namespace) -> dict[str, Any]:
    client = _Client([int(p) for p in args.ports.split(",")])
    await asyncio.gather(*(u.connect() for u in client.upstreams for _ in range(args.connections)))
    requests = [_request(f"{args.prefix}{i}") for i in range(args.tenants)]
    kinds = [1 if i == args.active else 0 for i in range(args.tenants)]  # 1: in maintenance
    rng = random.Random(args.seed)
    interval = 1.0 / args.rate
    total = round(args.rate * (args.warmup + args.measure))
    ups, n_ups = client.upstreams, len(client.upstreams)
    start = time.monotonic() + 0.2
    print(f"start {start!r}", flush=True)
    first = math.ceil(args.warmup / interval - 1e-6)  # the first measured request
    cpu = [0.0, 0.0]
    lag: list[float] = []  # how late the client sent each measured request (its own share of latency)
    gc.disable()
    i = 0
    while i < total:
        now = time.monotonic()
        due = start + i * interval
        if due > now:
            await asyncio.sleep(due - now)
            continue
        while due <= now:
            if args.unknown and rng.random() < args.unknown:
                job = (due, 2, _request(f"{args.prefix}new{i}"))  # 2: never seen
            else:
                k = rng.randrange(args.tenants)
                job = (due, kinds[k], requests[k])
            ups[i % n_ups].submit(job)
            if i >= first:
                if i == first:
                    cpu[0] = time.process_time()
                lag.append(now - due)
            i += 1
            if i == total:
                break
            due = start + i * interval
    cpu[1] = time.process_time()
    deadline = time.monotonic() + args.drain
    while len(client.records) < total and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    client.closing = True
    ended = time.monotonic()
    gc.enable()
    pending = [c.job for u in client.upstreams for c in u.conns if c.job is not None]
    pending += [job for u in client.upstreams for job in u.waiting]
    summary = _summary(client.records, pending, start + first * interval, ended, args)
    summary["client_cpu"] = (cpu[1] - cpu[0]) / args.measure  # of one CPU, while scheduling
    summary["client_lag"] = _percentiles([x * 1000 for x in lag], [])
    return summary


def _percentiles(done: list[float], unanswered: list[float]) -> dict[str, Any]:
    """p50, p99 and p100 in ms. An unanswered request counts with its wait so far, a lower bound:
    a percentile it may have pulled down is flagged ``<name>_open`` (read it as "at least")."""
    if not done and not unanswered:
        return {"n": 0, "p50": None, "p99": None, "p100": None}
    values = sorted(done + unanswered)
    floor = min(unanswered, default=math.inf)
    out: dict[str, Any] = {"n": len(values), "unanswered": len(unanswered)}
    for name, p in (("p50", 50), ("p99", 99), ("p100", 100)):
        value = values[min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1)]
        out[name] = value
        out[f"{name}_open"] = floor <= value
    return out


def _summary(records, pending, first: float, ended: float, args: argparse.Namespace) -> dict[str, Any]:
    """Figures over the requests *scheduled* from ``first`` on (the measured interval)."""
    t0 = first
    t1 = t0 + args.measure
    measured = [r for r in records if r[0] >= first - 1e-6]
    completed_in = sum(1 for r in records if t0 <= r[1] < t1)
    latency: dict[str, list[float]] = {"all": [], "known": [], "unknown": []}
    statuses: Counter[int] = Counter()
    wrong = 0
    for scheduled, done, status, kind in measured:
        ms = (done - scheduled) * 1000
        latency["all"].append(ms)
        latency["unknown" if kind == 2 else "known"].append(ms)
        statuses[status] += 1
        wrong += (kind == 0 and status != 200) or (kind == 1 and status != 503)
    waited: dict[str, list[float]] = {"all": [], "known": [], "unknown": []}
    for scheduled, kind, _ in pending:
        if scheduled >= first - 1e-6:
            ms = (ended - scheduled) * 1000
            waited["all"].append(ms)
            waited["unknown" if kind == 2 else "known"].append(ms)
    unfinished = len(waited["all"])
    return {
        "offered": args.rate,
        "scheduled": len(measured) + unfinished,
        "achieved": completed_in / args.measure,
        "unfinished": unfinished,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "other_statuses": sum(v for k, v in statuses.items() if k not in (200, 503)),
        "wrong": wrong,
        **{name: _percentiles(values, waited[name]) for name, values in latency.items()},
    }


def client_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale --client")
    parser.add_argument("--client", action="store_true")
    parser.add_argument("--ports", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--tenants", type=int, required=True)
    parser.add_argument("--prefix", default="t")
    parser.add_argument("--active", type=int, default=-1, help="index of the tenant in maintenance")
    parser.add_argument("--unknown", type=float, default=0.0, help="share of requests for new tenants")
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--measure", type=float, default=5.0)
    parser.add_argument("--drain", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_drive(args))), flush=True)


# --- the parent: database, workers, proxy, sampler ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, **extra, "PYTHONPATH": ROOT if not path else f"{ROOT}{os.pathsep}{path}"}


@contextlib.contextmanager
def _workers(count: int, env: dict[str, str]) -> Iterator[list[int]]:
    """``count`` single-worker uvicorn processes serving :func:`make_app`; yields their ports."""
    ports = [_free_port() for _ in range(count)]
    logs = [tempfile.TemporaryFile() for _ in ports]  # noqa: SIM115 - closed below
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port, log in zip(ports, logs, strict=True):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        "benchmarks.scale:make_app",
                        "--factory",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--http",
                        "h11",
                        "--loop",
                        "asyncio",
                        "--lifespan",
                        "on",
                        "--log-level",
                        "warning",
                        "--no-access-log",
                        "--timeout-keep-alive",
                        "60",
                        "--timeout-graceful-shutdown",
                        "1",
                    ],
                    env=_subprocess_env(env),
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + 30
        for port, proc, log in zip(ports, procs, logs, strict=True):
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
                    break
                except Exception:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        tail = log.read()[-2000:].decode(errors="replace")
                        raise RuntimeError(f"uvicorn on port {port} did not start:\n{tail}") from None
                    time.sleep(0.05)
        yield ports
    finally:
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


class _Sampler:
    """Reads the run database's transaction count and state-table scans; one transaction per sample."""

    QUERY = (
        "SELECT pg_stat_force_next_flush(),"
        " (SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()),"
        " (SELECT coalesce(sum(coalesce(seq_scan, 0) + coalesce(idx_scan, 0)), 0)"
        "  FROM pg_stat_user_tables WHERE relname = %s)"
    )

    def __init__(self, conninfo: str, table: str) -> None:
        import psycopg

        self.conn = psycopg.connect(conninfo, autocommit=True)
        self.conn.prepare_threshold = None  # preparing would cost one more transaction, once
        self.table = table
        self.taken = 0
        self.sample()  # flushes what connecting cost; from here each sample adds exactly one

    def sample(self) -> tuple[float, float, float]:
        before = time.monotonic()
        _, xacts, scans = self.conn.execute(self.QUERY, (self.table,)).fetchone()  # type: ignore[misc]
        when = (before + time.monotonic()) / 2
        own = self.taken  # this sampler's transactions already counted in ``xacts``
        self.taken += 1
        return when, float(xacts) - own, float(scans)

    def collect(self, t0: float, t1: float, every: float = 0.1) -> list[tuple[float, float, float]]:
        """Samples from ``t0`` to ``t1`` (monotonic)."""
        samples = []
        next_at = t0
        while True:
            now = time.monotonic()
            if now < next_at:
                time.sleep(next_at - now)
            samples.append(self.sample())
            next_at += every
            if next_at > t1:
                return samples

    def close(self) -> None:
        self.conn.close()


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)  # idle and iowait are not busy


def _cpu_busy(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Share of all the machine's CPUs busy between two readings."""
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def _slope(points: list[tuple[float, float]]) -> float:
    """Theil-Sen slope (median over sample pairs at least 1 s apart) of a counter PostgreSQL flushes
    in steps, each backend about once a second: robust to a step landing early or late in the interval."""
    slopes = sorted(
        (y2 - y1) / (t2 - t1)
        for i, (t1, y1) in enumerate(points)
        for t2, y2 in points[i + 1 :]
        if t2 - t1 >= 1.0
    )
    return slopes[len(slopes) // 2] if slopes else math.nan


def _start_client(ports: list[int], **options: Any) -> tuple[subprocess.Popen[str], float]:
    argv = [sys.executable, "-m", "benchmarks.scale", "--client", "--ports", ",".join(map(str, ports))]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    proc = subprocess.Popen(argv, cwd=ROOT, env=_subprocess_env({}), stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line.startswith("start "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the load client did not start: {line!r}")
    return proc, float(line.split()[1])


def _finish_client(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"the load client failed with exit code {proc.returncode}")
    return json.loads(out)


@contextlib.contextmanager
def _client(ports: list[int], **options: Any) -> Iterator[tuple[subprocess.Popen[str], float]]:
    proc, start = _start_client(ports, **options)
    try:
        yield proc, start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _env(db_url: str) -> dict[str, str]:
    return {"MAINTGATE_BENCH_URL": db_url, "MAINTGATE_BENCH_PREFIX": PREFIX, "MAINTGATE_BENCH_TTL": str(TTL)}


def _scale_row(
    db_url: str, sampler: _Sampler, tenants: int, *, rate: float, warmup: float, measure: float, drain: float
) -> dict[str, Any]:
    with (
        _workers(WORKERS, _env(db_url)) as ports,
        _client(
            ports,
            rate=rate,
            tenants=tenants,
            prefix=f"s{tenants}t",
            warmup=warmup,
            measure=measure,
            drain=drain,  # an overloaded row's backlog never drains: what is left is counted unanswered
        ) as (proc, start),
    ):
        t0 = start + warmup
        time.sleep(max(0.0, t0 - time.monotonic()))
        cpu = _cpu_times()
        samples = sampler.collect(t0, t0 + measure)
        cpu = _cpu_busy(cpu, _cpu_times())
        result = _finish_client(proc, timeout=warmup + measure + 30)
    result["machine_cpu"] = cpu
    result["lookups"] = _slope([(t, x) for t, x, _ in samples])
    result["scans"] = _slope([(t, s) for t, _, s in samples])
    result["tenants"] = tenants
    return result


def _outage_row(db_url: str, mode: str, *, rate: float, warmup: float, measure: float) -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    from maintgate import MaintenanceStore

    url = make_url(db_url)
    prefix = f"o{mode[0]}t"
    store = MaintenanceStore(db_url, table_prefix=PREFIX)
    try:
        store.activate(f"{prefix}0", message="scale benchmark: outage row")
    finally:
        store.engine.dispose()
    proxy = TCPProxy((url.host or "127.0.0.1", url.port or 5432))
    try:
        through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        with _workers(WORKERS, _env(through)) as ports:
            try:
                with _client(
                    ports,
                    rate=rate,
                    tenants=OUTAGE_TENANTS,
                    prefix=prefix,
                    active=0,
                    unknown=UNKNOWN_SHARE,
                    warmup=warmup,
                    measure=measure,
                    drain=5.5,  # past the store's 5 s bounds: a request hung on the database still ends
                ) as (proc, start):
                    time.sleep(max(0.0, start + warmup - time.monotonic()))
                    proxy.cut(mode)
                    result = _finish_client(proc, timeout=warmup + measure + 30)
            finally:
                proxy.cut("refuse")  # black-holed connects fail now, so the workers stop promptly
    finally:
        proxy.close()
    result["mode"] = mode
    return result


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While running, SIGTERM unwinds like an error, so the workers, client and database are cleaned up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _scans_per_read(db_url: str, sampler: _Sampler) -> float:
    """Scans of the state table that one of a gate's reads of what changed makes (its query may
    use several index scans, one per condition), measured on the run's database."""
    from maintgate import MaintenanceStore

    store = MaintenanceStore(db_url, table_prefix=PREFIX)

    def scans() -> float:
        store.engine.dispose()  # a backend's statistics are flushed as it ends
        time.sleep(0.5)
        return sampler.sample()[2]

    try:
        store.activate("calibration")
        store.deactivate("calibration")
        since = store.changes(None).version
        before = scans()
        for _ in range(10):
            store.changes(since)
        after = scans()
    finally:
        store.engine.dispose()
    return max(1.0, round((after - before) / 10, 1))


def run(url: str, quick: bool = False, rate: float = RATE) -> dict[str, Any]:
    """The scale rows and the outage rows; creates (and drops) a database of its own on ``url``'s server."""
    from sqlalchemy.engine import make_url

    warmup, measure, outage, drain = (1.0, 2.0, 2.5, 1.0) if quick else (1.5, 5.0, 4.0, 2.0)
    with _sigterm_as_exit():
        return _run(make_url(url), rate=rate, warmup=warmup, measure=measure, outage=outage, drain=drain)


def _run(
    admin_url: Any, *, rate: float, warmup: float, measure: float, outage: float, drain: float
) -> dict[str, Any]:
    import psycopg

    from maintgate import MaintenanceStore

    name = f"maintgate_scale_{uuid.uuid4().hex[:10]}"
    db_url = admin_url.set(database=name).render_as_string(hide_password=False)
    libpq = admin_url.set(drivername="postgresql")
    admin = psycopg.connect(libpq.render_as_string(hide_password=False), autocommit=True)
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        sampler = None
        try:
            store = MaintenanceStore(db_url, table_prefix=PREFIX)
            try:
                store.create_tables()
            finally:
                store.engine.dispose()
            sampler = _Sampler(libpq.set(database=name).render_as_string(hide_password=False), STATE_TABLE)
            per_read = _scans_per_read(db_url, sampler)
            rows = [
                _scale_row(db_url, sampler, n, rate=rate, warmup=warmup, measure=measure, drain=drain)
                for n in TENANTS
            ]
            outages = [
                _outage_row(db_url, mode, rate=rate, warmup=warmup, measure=outage)
                for mode in ("refuse", "blackhole")
            ]
        finally:
            if sampler is not None:
                sampler.close()
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()
    for row in rows:
        row["reads"] = row["scans"] / per_read
    return {
        "scans_per_read": per_read,
        "workers": WORKERS,
        "ttl": TTL,
        "rate": rate,
        "measure": measure,
        "outage": outage,
        "outage_tenants": OUTAGE_TENANTS,
        "unknown_share": UNKNOWN_SHARE,
        "rows": rows,
        "outages": outages,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--client" in argv:
        client_main(argv)
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 s per row instead of 5")
    parser.add_argument("--rate", type=float, default=RATE)
    parser.add_argument(
        "--url",
        default=os.environ.get(
            "MAINTGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the raw figures instead of the table")
    args = parser.parse_args(argv)
    result = run(args.url, quick=args.quick, rate=args.rate)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    from .__main__ import Table, _scale_section

    table = Table()
    _scale_section(result, table)
    print(f"\n{table.missed} target(s) missed")
    return 1 if table.missed else 0


if __name__ == "__main__":
    sys.exit(main())
