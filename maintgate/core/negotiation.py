"""Pick the 503's media type from an Accept header (RFC 9110 §12.5.1), bounded and never raising."""

from __future__ import annotations

from functools import lru_cache

PROBLEM_JSON = "application/problem+json"
HTML = "text/html"
TEXT = "text/plain"

# Offers in the server's order of preference: ties go to the earlier one, so a client
# that sends no Accept, or */*, gets JSON, which is what API clients need.
_OFFERS: tuple[tuple[str, str, str], ...] = (
    ("application", "problem+json", PROBLEM_JSON),
    ("application", "json", PROBLEM_JSON),
    ("text", "html", HTML),
    ("application", "xhtml+xml", HTML),
    ("text", "plain", TEXT),
)
MAX_ACCEPT_LENGTH = 4096
MAX_MEDIA_RANGES = 64


def _quality(params: list[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0  # also rejects NaN
    return 1.0


def _ranges(accept: str) -> list[tuple[str, str, float]]:
    ranges = []
    for item in accept[:MAX_ACCEPT_LENGTH].split(",")[:MAX_MEDIA_RANGES]:
        media, *params = item.split(";")
        main, sep, sub = media.strip().lower().partition("/")
        if not sep or not main or not sub or (main == "*" and sub != "*"):
            continue
        ranges.append((main, sub, _quality(params)))
    return ranges


def negotiate(accept: str | None) -> str:
    """The media type to answer with: problem+json, HTML or plain text.

    For each offer the most specific matching range sets its quality; the best
    quality wins, and at equal quality an offer the client named beats one it only
    matched with a wildcard (Internet Explorer's ``text/html, …, */*`` gets HTML).
    No usable Accept, or nothing acceptable, means JSON.
    """
    if not accept:
        return PROBLEM_JSON
    if len(accept) > _CACHED_LENGTH:
        return _negotiate(accept)
    return _negotiate_cached(accept)


_CACHED_LENGTH = 512  # longer values are rare and would make the cache's memory unbounded


def _negotiate(accept: str) -> str:
    ranges = _ranges(accept)
    best, best_rank = PROBLEM_JSON, (0.0, -1)
    for main, sub, answer in _OFFERS:
        q, specificity = 0.0, -1
        for r_main, r_sub, r_q in ranges:
            if r_main == main and r_sub == sub:
                s = 2
            elif r_main == main and r_sub == "*":
                s = 1
            elif r_main == "*":
                s = 0
            else:
                continue
            if s > specificity:
                q, specificity = r_q, s
        if q > 0 and (q, specificity) > best_rank:
            best, best_rank = answer, (q, specificity)
    return best


_negotiate_cached = lru_cache(maxsize=256)(_negotiate)
