"""Rendering: problem details, escaped HTML, plain text, customisation."""

from __future__ import annotations

import json

import pytest

from maintgate import MaintenanceState, Renderer

STATE = MaintenanceState(
    tenant="demo", active=True, message='<script>alert("x")</script> & more', error="boom <b>"
)


def test_json_is_problem_details():
    body = json.loads(Renderer().render_json(STATE, "demo", 600))
    assert body == {
        "type": "about:blank",
        "title": "Service Unavailable",
        "status": 503,
        "detail": STATE.message,
        "tenant": "demo",
        "retry_after": 600,
    }


def test_html_escapes_every_value_and_hides_the_error_by_default():
    page = Renderer().render_html(STATE, "demo", 30).decode()
    assert "<script>" not in page and "&lt;script&gt;" in page and "&amp; more" in page
    assert "boom" not in page
    assert '<html lang="en">' in page and "<title>" in page
    assert 'http-equiv="refresh" content="30"' in page
    exposed = Renderer(expose_error=True).render_html(STATE, "demo", 30).decode()
    assert "boom &lt;b&gt;" in exposed


def test_custom_texts_and_template():
    r = Renderer(
        html_template="<p lang=$lang>$title|$message|$tenant|$retry_after</p>",
        title="Wartung",
        lang="de",
        default_message="Bitte später",
    )
    state = MaintenanceState(tenant="demo", active=True)
    assert r.render_html(state, "a&b", 5).decode() == "<p lang=de>Wartung|Bitte später|a&amp;b|5</p>"


def test_custom_problem_builder():
    r = Renderer(
        problem=lambda state, tenant, retry: {"code": "MAINTENANCE", "tenant": tenant, "retry": retry}
    )
    assert json.loads(r.render_json(STATE, "demo", 9)) == {
        "code": "MAINTENANCE",
        "tenant": "demo",
        "retry": 9,
    }


def test_bad_templates_are_refused_when_built():
    with pytest.raises(ValueError, match="placeholders"):
        Renderer(html_template="$nope")
    with pytest.raises(ValueError, match="placeholders"):
        Renderer(html_template="$")
    with pytest.raises(ValueError, match="tenant_text"):
        Renderer(tenant_text="{oops}")


def test_a_read_only_message_is_its_own_sentence():
    """Issue 11, point 8: "Renaming a field You can still read" read as one garbled sentence."""
    import json as _json

    from maintgate import MaintenanceState, Renderer

    renderer = Renderer()
    for message, expected in (
        ("Renaming a field", "Renaming a field. You can still read"),
        ("Renaming a field.", "Renaming a field. You can still read"),
        ("Back soon!", "Back soon! You can still read"),
    ):
        state = MaintenanceState(tenant="demo", active=True, message=message, mode="read_only")
        detail = _json.loads(renderer.render_json(state, "demo", 60))["detail"]
        assert detail.startswith(expected), detail


@pytest.mark.parametrize(
    ("option", "text"),
    [
        ("tenant_text", "{tenant.x}"),
        ("tenant_text", "{tenant[x]}"),
        ("retry_text", "{seconds.y}"),
        ("retry_text", "{seconds[0]}"),
        ("retry_text", "{seconds:c}"),
    ],
)
def test_format_strings_that_would_fail_on_some_request_are_refused_when_built(option, text):
    from maintgate import InvalidArgument, Renderer

    with pytest.raises(InvalidArgument) as info:
        Renderer(**{option: text})
    assert info.value.option == option
