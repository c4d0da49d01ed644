"""Bodies of the 503: RFC 9457 problem details, an HTML page and plain text."""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable
from string import Template
from typing import Any

from .errors import InvalidArgument, callable_option
from .negotiation import HTML, PROBLEM_JSON
from .state import MaintenanceState

logger = logging.getLogger("maintgate")

ProblemBuilder = Callable[[MaintenanceState, "str | None", int], dict[str, Any]]

DEFAULT_HTML = """<!doctype html>
<html lang="$lang">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta http-equiv="refresh" content="$retry_after">
<link rel="icon" href="data:,">
<title>$title</title>
<style>
:root{color-scheme:light dark;--fg:#1f2328;--bg:#fff;--muted:#59636e}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--bg:#0d1117;--muted:#9198a1}}
body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;
font:1.05rem/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:36rem;padding:1.5rem}
h1{font-size:1.6rem;margin:0 0 .75rem}
p{margin:.5rem 0}.muted{color:var(--muted)}
</style>
</head>
<body>
<main>
<h1>$title</h1>
<p>$message</p>
$details
<p class="muted">$retry_text</p>
</main>
</body>
</html>
"""

TEMPLATE_FIELDS = frozenset(
    {"lang", "title", "message", "tenant", "details", "retry_after", "retry_text", "error"}
)


class Renderer:
    """Turns a maintenance state into a 503 body; its texts and templates can be replaced.

    Every value put into HTML is escaped. ``state.error`` is shown only with
    ``expose_error=True``: it is an operator's detail, not a client's.
    """

    def __init__(
        self,
        *,
        html_template: str = DEFAULT_HTML,
        title: str = "Down for maintenance",
        default_message: str = "This service is undergoing maintenance. Please try again shortly.",
        tenant_text: str = "Tenant: {tenant}",
        retry_text: str = "This page reloads in {seconds} seconds.",
        read_only_text: str = "You can still read; changes cannot be saved until maintenance ends.",
        lang: str = "en",
        problem_type: str = "about:blank",
        problem: ProblemBuilder | None = None,
        expose_error: bool = False,
    ) -> None:
        texts = {
            "html_template": html_template,
            "title": title,
            "default_message": default_message,
            "tenant_text": tenant_text,
            "retry_text": retry_text,
            "read_only_text": read_only_text,
            "lang": lang,
            "problem_type": problem_type,
        }
        for name, value in texts.items():
            if not isinstance(value, str):
                raise InvalidArgument(f"{name} must be a string, got {value!r}", name)
        callable_option("problem", problem, "a callable (state, tenant, retry_after) -> dict")
        if not isinstance(expose_error, bool):
            raise InvalidArgument(f"expose_error must be True or False, got {expose_error!r}", "expose_error")
        self.template = Template(html_template)
        unknown = set(self.template.get_identifiers()) - TEMPLATE_FIELDS
        if unknown or not self.template.is_valid():
            raise InvalidArgument(
                f"html_template uses unknown or malformed placeholders {sorted(unknown)}; "
                f"allowed: {sorted(TEMPLATE_FIELDS)}",
                "html_template",
            )
        for name, text, samples in (
            ("tenant_text", tenant_text, [{"tenant": "t"}, {"tenant": "a-long.tenant_id"}]),
            ("retry_text", retry_text, [{"seconds": 1}, {"seconds": 10**9}]),
        ):
            try:
                for fields in samples:  # the values a request may bring, the largest included
                    text.format(**fields)
            except Exception as exc:
                raise InvalidArgument(f"{name} {text!r} is not a valid format string: {exc}", name) from None
        self.title = title
        self.default_message = default_message
        self.tenant_text = tenant_text
        self.retry_text = retry_text
        self.read_only_text = read_only_text
        self.lang = lang
        self.problem_type = problem_type
        self.problem = problem
        self.expose_error = expose_error

    def render(self, media_type: str, state: MaintenanceState, tenant: str | None, retry_after: int) -> bytes:
        """The body for ``media_type`` (one of negotiation's answers)."""
        if media_type == PROBLEM_JSON:
            return self.render_json(state, tenant, retry_after)
        if media_type == HTML:
            return self.render_html(state, tenant, retry_after)
        return self.render_text(state, tenant, retry_after)

    def message(self, state: MaintenanceState) -> str:
        """The message shown to clients: the state's own, or the default."""
        return state.message or self.default_message

    def render_json(self, state: MaintenanceState, tenant: str | None, retry_after: int) -> bytes:
        """An RFC 9457 problem-details document, with ``tenant`` and ``retry_after`` members."""
        if self.problem is not None:
            try:
                custom = self.problem(state, tenant, retry_after)
                return json.dumps(custom, ensure_ascii=True, default=str).encode("ascii")
            except Exception:
                logger.exception(
                    "maintgate: custom problem builder %r failed; using the default", self.problem
                )
        body: dict[str, Any] = {
            "type": self.problem_type,
            "title": "Service Unavailable",
            "status": 503,
            "detail": self.message(state),
            "tenant": tenant,
            "retry_after": retry_after,
        }
        if state.read_only:
            body["read_only"] = True
            body["detail"] = f"{_sentence(body['detail'])} {self.read_only_text}"
        error = self.public_error(state)
        if error:
            body["error"] = error
        return json.dumps(body, ensure_ascii=True, default=str).encode("ascii")

    def public_error(self, state: MaintenanceState) -> str:
        """What clients may see of a failed window's error: its first line, and only with ``expose_error``.

        A database's ``DETAIL:`` lines can carry row data; the operator's record keeps them.
        """
        if not self.expose_error or not state.error:
            return ""
        return state.error.strip().splitlines()[0]

    def render_html(self, state: MaintenanceState, tenant: str | None, retry_after: int) -> bytes:
        """The maintenance page, every substituted value escaped."""
        esc = html.escape
        details = []
        if state.read_only:
            details.append(f"<p>{esc(self.read_only_text)}</p>")
        if tenant:
            details.append(f"<p>{esc(self.tenant_text.format(tenant=tenant))}</p>")
        error = self.public_error(state)
        if error:
            details.append(f'<p class="muted">{esc(error)}</p>')
        page = self.template.substitute(
            lang=esc(self.lang),
            title=esc(self.title),
            message=esc(self.message(state)),
            tenant=esc(tenant or ""),
            details="\n".join(details),
            retry_after=retry_after,
            retry_text=esc(self.retry_text.format(seconds=retry_after)),
            error=esc(error),
        )
        return page.encode("utf-8")

    def render_text(self, state: MaintenanceState, tenant: str | None, retry_after: int) -> bytes:
        """A short plain-text notice."""
        lines = [self.title, self.message(state)]
        if state.read_only:
            lines.append(self.read_only_text)
        if tenant:
            lines.append(self.tenant_text.format(tenant=tenant))
        lines.append(f"Retry after {retry_after} seconds.")
        return ("\n".join(lines) + "\n").encode("utf-8")


def _sentence(text: str) -> str:
    """``text`` ending like a sentence, so that another can follow it."""
    text = text.rstrip()
    return text if not text or text[-1] in ".!?…:;" else text + "."
