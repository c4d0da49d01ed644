"""A real PgBouncer in transaction pooling mode in front of the test PostgreSQL server."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_URL, require_postgres

REQUIRE_PGBOUNCER = os.environ.get("MAINTGATE_REQUIRE_PGBOUNCER") == "1"


def _pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    message = (
        "pgbouncer not installed; enable these tests with `sudo apt-get install -y pgbouncer` "
        "(do not start its service); CI sets MAINTGATE_REQUIRE_PGBOUNCER=1 to fail instead."
    )
    if REQUIRE_PGBOUNCER:
        pytest.fail(message)
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@contextlib.contextmanager
def run_pgbouncer(pool_size: int = 2) -> Iterator[str]:
    """Run pgbouncer (pool_mode=transaction, default_pool_size=pool_size) and yield its SQLAlchemy URL."""
    require_postgres()
    binary = _pgbouncer_binary()
    upstream = make_url(POSTGRES_URL)
    user = upstream.username or "postgres"
    target = f"host={upstream.host or '127.0.0.1'} port={upstream.port or 5432} dbname={upstream.database}"
    if upstream.password:
        target += f" password={upstream.password}"
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="maintgate-pgbouncer-") as tmp:
        d = Path(tmp)
        (d / "users.txt").write_text(f'"{user}" ""\n')
        (d / "pgbouncer.ini").write_text(
            f"[databases]\n{upstream.database} = {target}\n\n[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {d / 'users.txt'}\nadmin_users = {user}\n"
            f"pool_mode = transaction\ndefault_pool_size = {pool_size}\n"
            f"logfile = {d / 'pgbouncer.log'}\npidfile = {d / 'pgbouncer.pid'}\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
        )
        cmd = [binary]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root: drop to an unprivileged user
            run_as = "postgres" if _user_exists("postgres") else "nobody"
            entry = pwd.getpwnam(run_as)
            for p in (d, *d.iterdir()):
                os.chown(p, entry.pw_uid, entry.pw_gid)
            cmd += ["-u", run_as]
        cmd.append(str(d / "pgbouncer.ini"))
        output = (d / "stderr.log").open("wb")  # a file, not a pipe: a full pipe would stall pgbouncer
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT)
        try:
            # the admin console exists only in pgbouncer: never mistake another server on the port for it
            admin = f"host=127.0.0.1 port={port} dbname=pgbouncer user={user} connect_timeout=2"
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (d / "stderr.log").read_text(errors="replace")
                    raise RuntimeError(f"pgbouncer did not start ({proc.poll()=}): {log}")
                try:
                    with psycopg.connect(admin, autocommit=True) as conn:
                        conn.execute("SHOW VERSION")
                    break
                except psycopg.OperationalError:
                    time.sleep(0.05)
            yield upstream.set(host="127.0.0.1", port=port, password=None).render_as_string(False)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            output.close()


@pytest.fixture(scope="module")
def pgbouncer_url() -> Iterator[str]:
    """SQLAlchemy URL of a PgBouncer (transaction pooling, 2 server connections) shared by the module."""
    with run_pgbouncer() as url:
        yield url
