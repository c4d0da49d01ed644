"""Accept negotiation: q-values, wildcards, specificity, garbage."""

from __future__ import annotations

import pytest

from maintgate.core.negotiation import HTML, PROBLEM_JSON, TEXT, negotiate

CHROME = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
FIREFOX = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, PROBLEM_JSON),
        ("", PROBLEM_JSON),
        ("*/*", PROBLEM_JSON),
        ("application/json", PROBLEM_JSON),
        ("application/problem+json", PROBLEM_JSON),
        ("application/*", PROBLEM_JSON),
        (CHROME, HTML),
        (FIREFOX, HTML),
        ("text/html", HTML),
        ("text/*", HTML),
        ("text/plain", TEXT),
        ("text/plain, text/html;q=0.5", TEXT),
        ("text/html;q=0.5, application/json;q=0.9", PROBLEM_JSON),
        ("application/json;q=0.5, text/html;q=0.5", PROBLEM_JSON),
        ("text/*;q=0.9, text/html;q=0.1", TEXT),
        ("text/html;q=0, */*", PROBLEM_JSON),
        ("*/*;q=0.1, text/plain;q=0.2", TEXT),
        ("image/png", PROBLEM_JSON),
        ("application/json;q=0", PROBLEM_JSON),
        ("TEXT/HTML", HTML),
        ("text/html;level=1;q=0.7, application/json;q=0.6", HTML),
        ("text/html;q=nan, text/plain", TEXT),
        ("text/html;q=2, text/plain;q=0.5", TEXT),
        ("text/html;q=abc", PROBLEM_JSON),
        (";;;,,,/,*/,/*,", PROBLEM_JSON),
        ("*/html, text/plain", TEXT),
        ("\x00\xff garbage", PROBLEM_JSON),
        ("text/plain;q=0.1," * 5000 + "text/html", TEXT),
    ],
)
def test_negotiate(accept, expected):
    assert negotiate(accept) == expected


def test_a_huge_header_is_cut_short():
    assert negotiate("x" * 1_000_000 + ", text/html") == PROBLEM_JSON


@pytest.mark.parametrize(
    "accept",
    [
        "text/html, application/xhtml+xml, image/jxr, */*",  # Internet Explorer 11, the old Edge
        "text/html, application/xhtml+xml, */*",
        "image/jpeg, application/x-ms-application, text/html, */*",
    ],
)
def test_an_offer_named_explicitly_beats_one_matched_by_a_wildcard_at_the_same_quality(accept):
    assert negotiate(accept) == HTML


def test_among_explicit_offers_at_the_same_quality_the_servers_order_decides():
    assert negotiate("text/html, application/json") == PROBLEM_JSON
    assert negotiate("*/*") == PROBLEM_JSON
