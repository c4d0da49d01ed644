"""``maintgate demo`` replays the seed story end to end, as the README's main command runs it."""

from __future__ import annotations

import subprocess
import sys
import time


def test_demo_replays_the_seed_story_in_under_30_seconds():
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "maintgate", "demo"], capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for step in (
        "API client: 200 application/json",
        "API client: 503 application/problem+json, Retry-After: 30",
        "browser: 503 text/html, Retry-After: 30",
        "the rename and the switch-off committed in one transaction",
        "rolled back: contacts columns are ['id', 'name', 'main-email-contact']",
        "error='OperationalError",
        "demo: IN MAINTENANCE",
        "maintgate off demo",
        "done: every step behaved as promised",
    ):
        assert step in out, f"missing {step!r} in:\n{out}"
    assert "Traceback" not in done.stderr
    assert elapsed < 30
