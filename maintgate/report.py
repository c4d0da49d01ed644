"""What the CLI and the demo print: tenants' status, what ``off`` ended, history lines.

Status says what a gate answers now and why, derived the way gates derive it
(:func:`maintgate.core.state.in_force`, strictest first), not just the tenant's own row.
"""

from __future__ import annotations

import re
from typing import Any

from .core.state import (
    ALL_TENANTS,
    WINDOW,
    Ended,
    HistoryEntry,
    MaintenanceState,
    Schedule,
    in_force,
    strictness,
    utcnow,
)
from .core.store import MaintenanceStore, iso, state_fields

SERVING, MAINTENANCE, READ_ONLY = "serving", "maintenance", "read_only"
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with every control character escaped (``\\x1b``, ``\\u202e``): stored data cannot
    move the cursor, clear the screen, start a line of its own or reverse what follows it."""
    return _CONTROL.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class Terminal:
    """Writes lines to a text stream (a file, or Django's ``self.stdout``) with their control
    characters escaped: a newline inside a line comes from the data and cannot start one."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def line(self, text: str) -> None:
        """One line of text, escaped, and its end."""
        self.stream.write(printable(text) + "\n")

    def lines(self, lines: list[str]) -> None:
        """Several lines, each escaped on its own."""
        for text in lines:
            self.line(text)

    def raw(self, text: str) -> None:
        """Text that escapes its own control characters (JSON), as it is."""
        self.stream.write(text + "\n")


def _owner_json(state: MaintenanceState | HistoryEntry) -> dict[str, Any] | None:
    owner = state.owner
    return None if owner is None else {"host": owner.host, "pid": owner.pid, "backend_pid": owner.backend_pid}


def schedule_json(schedule: Schedule) -> dict[str, Any]:
    """A planned window as ``status --json`` prints it."""
    return {
        "id": schedule.id,
        "starts_at": iso(schedule.starts_at),
        "ends_at": iso(schedule.ends_at),
        "mode": schedule.mode,
        "message": schedule.message,
    }


def reason(state: MaintenanceState) -> str:
    """Why ``state`` puts its tenants in maintenance, in a few words."""
    scope = "global " if state.is_global else ""
    if state.schedule_id is not None:
        return f"{scope}schedule #{state.schedule_id}"
    if state.is_global:
        return "the global switch"
    if state.window_id is not None:
        owner = f" of {state.owner.host} pid {state.owner.pid}" if state.owner else ""
        window = f"window {state.window_id}{owner}"
        return window if state.source == WINDOW else f"its own switch and {window}"
    return "its own switch"


def status(store: MaintenanceStore, tenant: str | None = None) -> list[dict[str, Any]]:
    """``status --json``: each recorded tenant's row (or one tenant's), with what the gate answers
    now (``effective``) and why (``reason``, the state that wins; ``reasons``, all in force)."""
    planned: dict[str, list[Schedule]] = {}
    scheduled = store.schedules() if tenant is None else store.schedules(tenant)
    if tenant not in (None, ALL_TENANTS):
        scheduled += store.schedules(ALL_TENANTS)
    for item in scheduled:
        planned.setdefault(item.tenant, []).append(item)
    if tenant is not None:
        states = [store.get(tenant) or MaintenanceState(tenant=tenant, active=False)]
        everyone = states[0] if tenant == ALL_TENANTS else store.get(ALL_TENANTS)
    else:
        states = store.all()
        known = {s.tenant for s in states}
        states += [MaintenanceState(tenant=t, active=False) for t in sorted(planned) if t not in known]
        everyone = next((s for s in states if s.is_global), None)
    now = utcnow()
    global_force = in_force(everyone, planned.get(ALL_TENANTS, ()), now)[0]
    rows = []
    for state in states:
        applying = in_force(state, planned.get(state.tenant, ()), now)[0]
        if not state.is_global:
            applying += global_force
        applying.sort(key=strictness)
        winner = applying[0] if applying else None
        alive = store.window_alive(state)
        rows.append(
            {
                "tenant": state.tenant,
                **state_fields(state),
                "effective": SERVING if winner is None else READ_ONLY if winner.read_only else MAINTENANCE,
                "reason": None if winner is None else reason(winner),
                "reasons": [reason(s) for s in applying],
                "effective_message": None if winner is None else winner.message,
                "effective_since": None if winner is None else iso(winner.started_at),
                "owner": _owner_json(state),
                "owner_alive": alive,
                "window": None
                if state.window_id is None
                else {"id": state.window_id, "lease_until": iso(state.lease_until), "alive": alive},
                "scheduled": [schedule_json(s) for s in planned.get(state.tenant, [])],
            }
        )
    return rows


def status_lines(data: dict[str, Any]) -> list[str]:
    """One ``status`` row as lines of text: what the gate answers and why, the window, the plan."""
    name = "ALL TENANTS" if data["tenant"] == ALL_TENANTS else data["tenant"]
    effective = data["effective"]
    if effective == SERVING:
        parts = [f"{name}: serving"]
    else:
        what = "IN READ-ONLY MAINTENANCE" if effective == READ_ONLY else "IN MAINTENANCE"
        parts = [f"{name}: {what} because of {data['reason']}"]
        if len(data["reasons"]) > 1:
            parts.append(f"(also {', '.join(data['reasons'][1:])})")
        if data["effective_message"]:
            parts.append(f"message={data['effective_message']!r}")
        if data["effective_since"]:
            parts.append(f"since {data['effective_since']}")
    window = data.get("window")
    if window:
        parts.append(_window_text(data))
    if data["error"]:
        parts.append(f"error={data['error'].splitlines()[0]!r}")
    lines = ["  ".join(parts)]
    for planned in data.get("scheduled", []):
        what = f" {planned['message']!r}" if planned["message"] else ""
        lines.append(f"    scheduled #{planned['id']}: {span(planned)} ({planned['mode']}){what}")
    return lines


def _window_text(data: dict[str, Any]) -> str:
    window, owner = data["window"], data["owner"] or {}
    held = f"window {window['id']} held by {owner.get('host')} pid {owner.get('pid')}"
    if window["alive"] and window["lease_until"]:
        return held + f", lease until {window['lease_until']}: new windows are refused until then"
    if window["alive"]:
        return held + ": its migration transaction holds the tenant's lock; new windows are refused"
    return held + ": GONE (its lease expired or its transaction ended); the next window takes over"


def ended_lines(ended: Ended, after: dict[str, Any]) -> list[str]:
    """What ``off`` ended, what it cleared, and what still holds the tenant afterwards."""
    name = "ALL TENANTS" if ended.tenant == ALL_TENANTS else ended.tenant
    what = ["its own switch"] if ended.switch else []
    what += [f"schedule #{s.id} ({span(schedule_json(s))})" for s in ended.schedules]
    if what:
        lines = [f"{name}: ended {', '.join(what)}"]
    else:
        lines = [f"{name}: nothing to end: its own switch was off and no schedule was on"]
    released = ended.released
    if released is not None:
        gone = f" held by {released.owner.host} pid {released.owner.pid}" if released.owner else ""
        lines.append(f"  cleared window {released.window_id}{gone}: its owner is gone")
    if after["effective"] != SERVING:
        hint = " (`maintgate off --all` ends it)" if after["reason"] == "the global switch" else ""
        lines.append(f"  still in maintenance: {after['reason']}{hint}")
    else:
        lines.append("  serving now")
    window = after.get("window")
    if window and window["alive"]:
        owner = after["owner"] or {}
        lines.append(
            f"  window {window['id']} of {owner.get('host')} pid {owner.get('pid')} still runs: its "
            "migration is not done, and new windows are refused until it ends"
        )
    lines += [f"  still planned: #{p['id']} {span(p)}" for p in after.get("scheduled", [])]
    return lines


def span(planned: dict[str, Any] | Schedule) -> str:
    """When a planned window runs: ``FROM to UNTIL``, or ``from FROM until switched off``."""
    if isinstance(planned, Schedule):
        planned = schedule_json(planned)
    start, end = planned["starts_at"], planned["ends_at"]
    return f"{start} to {end}" if end else f"from {start} until switched off"


def history_json(entry: HistoryEntry) -> dict[str, Any]:
    """One history entry as ``history --json`` prints it."""
    return {
        "id": entry.id,
        "tenant": entry.tenant,
        "event": entry.event,
        "at": iso(entry.at),
        "message": entry.message,
        "error": entry.error,
        "owner": _owner_json(entry),
    }


def history_line(entry: HistoryEntry) -> str:
    """One history entry as text."""
    detail = entry.error or entry.message or ""
    who = f" by {entry.owner.host}:{entry.owner.pid}" if entry.owner else ""
    return f"{entry.at.isoformat()}  {entry.event:<17}{who}  {detail}".rstrip()


class ProgressBar:
    """A rollout's progress: one bar redrawn in place on a terminal, plain lines elsewhere
    (a log, a CI job) at most every ``every`` seconds."""

    def __init__(self, stream: Any, name: str, every: float = 5.0) -> None:
        self.stream = stream
        self.name = printable(name)
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.every = every
        self._last = -every
        self._drawn = False
        self.closed = False

    def update(self, progress: Any) -> None:
        """Show ``progress`` (a :class:`maintgate.fleet.Progress`); a closed output ends the display,
        never the rollout (``maintgate rollout run ... | head``)."""
        if self.closed:
            return
        try:
            self._draw(progress)
        except OSError:
            self.closed = True

    def _draw(self, progress: Any) -> None:
        left = progress.left - progress.running
        eta = f"{_duration(left / progress.rate)} left" if progress.rate > 0 and left > 0 else ""
        counts = (
            f"{progress.done}/{progress.total} done, {progress.failed} failed, {progress.running} running, "
            f"{progress.rate:.1f}/s"
        )
        if self.tty:
            width = 24
            filled = width * (progress.done + progress.failed) // max(1, progress.total)
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r{self.name} [{bar}] {counts} {eta}\x1b[K")
            self.stream.flush()
            self._drawn = True
        elif progress.elapsed - self._last >= self.every:
            self._last = progress.elapsed
            self.stream.write(f"rollout {self.name}: {counts}{', ' + eta if eta else ''}\n")
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self._drawn and not self.closed:
            self.stream.write("\n")


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def rollout_result_lines(result: Any) -> list[str]:
    """What a rollout run did, as ``maintgate rollout run`` ends."""
    lines = [
        f"rollout {result.name}: {len(result.done)} migrated now, {len(result.skipped)} done before, "
        f"{len(result.failed)} failed, {len(result.not_started)} not started"
        + (f", {len(result.done_elsewhere)} by other runners" if result.done_elsewhere else "")
        + (f", {len(result.dropped)} dropped (not in the list)" if result.dropped else "")
    ]
    if result.stopped:
        lines.append(f"  stopped: {result.stopped}")
    lines += [f"  note: {note}" for note in result.notes]
    for tenant, error in result.failed.items():
        first = error.splitlines()[0] if error else ""
        lines.append(f"  failed {tenant}: {first} (`maintgate status {tenant}` shows what it serves)")
    return lines


def rollout_lines(status: dict[str, Any]) -> list[str]:
    """``maintgate rollout status`` as text."""
    lines = [
        f"rollout {status['name']}: {status['done']}/{status['total']} done, {status['failed']} failed, "
        f"{status['running']} running, {status['pending']} pending"
        + (f", {status['dropped']} dropped (not in the last list)" if status["dropped"] else "")
    ]
    if status["stopped"]:
        lines.append(f"  stopped: {status['stopped']}")
    for failure in status["failures"]:
        first = (failure["error"] or "").splitlines()[0] if failure["error"] else ""
        lines.append(f"  failed {failure['tenant']} (attempts: {failure['attempts']}): {first}")
    return lines
