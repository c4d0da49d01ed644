"""Who may pass while a tenant is in maintenance: IP/CIDR allowlist, a signed secret cookie, a predicate.

Each rule is off unless configured, and they compose: any one that admits a request lets it pass.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from urllib.parse import parse_qsl, urlencode

from .errors import InvalidArgument, callable_option, positive_int
from .request import RequestView
from .response import Response
from .state import ALL_TENANTS, utcnow

logger = logging.getLogger("maintgate")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SecretSource = str | Mapping[str, str] | Callable[[str | None], "str | None"]

COOKIE = "maintgate_bypass"
QUERY = "maintgate_bypass"
HEADER = "x-maintgate-bypass"
MAX_FORWARDED_LENGTH = 2048
MAX_QUERY_LENGTH = 8192
FORWARDED = ("x-forwarded-for", "forwarded")
MIN_SECRET_LENGTH = 16
REFUSAL_LOG_EVERY = 60.0


def _check_secret(value: object, which: str = "") -> None:
    if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH:
        raise InvalidArgument(
            f"bypass_secret{which} must be a string of at least {MIN_SECRET_LENGTH} characters",
            "bypass_secret",
        )


def _networks(name: str, values: Iterable[str]) -> tuple[IPNetwork, ...]:
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, Iterable):
        raise InvalidArgument(f"{name} must be a list of IP addresses or CIDR networks, got {values!r}", name)
    networks = []
    for value in values:
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise InvalidArgument(f"{name}: {value!r} is not an IP address or CIDR network", name) from None
    return tuple(networks)


def _address(text: str | None) -> IPAddress | None:
    """An IP address from a peer or forwarded value ("1.2.3.4", "[::1]:80", '"[::1]"'), or None."""
    if not text:
        return None
    value = text.strip().strip('"')
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:  # IPv4 with a port
        value = value.partition(":")[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    # A dual-stack server reports IPv4 peers as ::ffff:a.b.c.d: compare them as the IPv4 they are.
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def _within(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


class Bypass:
    """The bypass rules of one gate; built once, consulted only for requests under maintenance."""

    def __init__(
        self,
        *,
        allow_ips: Iterable[str] = (),
        trusted_proxies: Iterable[str] = (),
        secret: SecretSource | None = None,
        cookie_max_age: int = 12 * 3600,
        predicate: Callable[[RequestView], bool] | None = None,
        forwarded_header: str = "x-forwarded-for",
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.allow_ips = _networks("allow_ips", allow_ips)
        self.trusted_proxies = _networks("trusted_proxies", trusted_proxies)
        if secret is not None and not (isinstance(secret, str | Mapping) or callable(secret)):
            raise InvalidArgument(
                "bypass_secret must be a string, a mapping of tenant to secret, or a callable",
                "bypass_secret",
            )
        if isinstance(secret, str):
            _check_secret(secret)
        elif isinstance(secret, Mapping):
            for tenant, value in secret.items():
                _check_secret(value, f" (the secret for {tenant!r})")
        positive_int("bypass_cookie_max_age", cookie_max_age)
        callable_option("bypass", predicate, "a callable taking the request view")
        if not isinstance(forwarded_header, str) or forwarded_header.strip().lower() not in FORWARDED:
            raise InvalidArgument(
                f"forwarded_header must be 'x-forwarded-for' or 'forwarded', got {forwarded_header!r}",
                "forwarded_header",
            )
        forwarded_header = forwarded_header.strip().lower()
        self.forwarded_header = forwarded_header
        self.secret = secret
        self.cookie_max_age = cookie_max_age
        self.predicate = predicate
        self._now = now
        self._refusal_logged = -REFUSAL_LOG_EVERY

    def __bool__(self) -> bool:
        return bool(self.allow_ips or self.secret is not None or self.predicate is not None)

    def client_ip(self, request: RequestView) -> IPAddress | None:
        """The client's address: the peer's, or behind trusted proxies the right-most untrusted one."""
        peer = _address(request.client)
        if peer is None or not self.trusted_proxies or not _within(peer, self.trusted_proxies):
            return peer
        chain = self._forwarded_chain(request)
        for address in reversed(chain):
            if not _within(address, self.trusted_proxies):
                return address
        return chain[0] if chain else peer

    def _forwarded_chain(self, request: RequestView) -> list[IPAddress]:
        """The addresses in the one header the trusted proxies write, left to right.

        Only the right end of a long header is read: that is where the proxies append, and a
        client's padding must not push their entries out. A cut first element is dropped.
        """
        value = request.header(self.forwarded_header) or ""
        if len(value) > MAX_FORWARDED_LENGTH:
            value = value[-MAX_FORWARDED_LENGTH:].partition(",")[2]
        chain: list[IPAddress | None] = []
        if self.forwarded_header == "forwarded":
            for element in value.split(","):
                for pair in element.split(";"):
                    name, _, item = pair.partition("=")
                    if name.strip().lower() == "for":
                        chain.append(_address(item))
        else:
            chain = [_address(part) for part in value.split(",") if part.strip()]
        if any(a is None for a in chain):
            # An unparsable hop (garbage, "unknown", an obfuscated id): trust nothing left of it.
            last_bad = max(i for i, a in enumerate(chain) if a is None)
            chain = chain[last_bad + 1 :]
        return [a for a in chain if a is not None]

    def secret_for(self, tenant: str | None) -> str | None:
        """The bypass secret that applies to ``tenant`` (None: no secret bypass for it)."""
        source = self.secret
        if source is None:
            return None
        if isinstance(source, str):
            return source
        if isinstance(source, Mapping):
            try:
                secret = source.get(tenant or ALL_TENANTS) or source.get(ALL_TENANTS)
            except Exception:
                logger.exception("maintgate: bypass secret mapping failed for tenant %r", tenant)
                return None
        else:
            try:
                secret = source(tenant)
            except Exception:
                logger.exception("maintgate: bypass secret callable failed for tenant %r", tenant)
                return None
        if secret is None or (isinstance(secret, str) and len(secret) >= MIN_SECRET_LENGTH):
            return secret
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_EVERY:
            self._refusal_logged = now
            logger.error(
                "maintgate: the bypass secret source gave a %s for tenant %r instead of a string "
                "of at least %d characters; no secret bypass for it (logged once a minute at most)",
                "shorter string" if isinstance(secret, str) else type(secret).__name__,
                tenant,
                MIN_SECRET_LENGTH,
            )
        return None

    def check(self, request: RequestView, tenant: str | None) -> Response | bool:
        """True to let the request pass, a redirect that sets the bypass cookie, or False."""
        if self.predicate is not None:
            try:
                if self.predicate(request):
                    return True
            except Exception:
                logger.exception("maintgate: bypass predicate %r failed; not bypassing", self.predicate)
        if self.allow_ips:
            address = self.client_ip(request)
            if address is not None and _within(address, self.allow_ips):
                return True
        secret = self.secret_for(tenant) if self.secret is not None else None
        if not secret:
            return False
        given = request.header(HEADER)
        if given is not None:
            return hmac.compare_digest(given.encode("latin-1"), secret.encode("utf-8"))
        cookie = _cookie(request.header("cookie"), COOKIE)
        if cookie is not None and self._valid_cookie(cookie, tenant, secret):
            return True
        query = request.query
        if QUERY in query:
            return self._redeem(request, tenant, secret)
        return False

    def _sign(self, secret: str, payload: str) -> str:
        digest = hmac.new(
            secret.encode("utf-8"), payload.encode("utf-8", "surrogateescape"), hashlib.sha256
        ).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def cookie_value(self, tenant: str | None, secret: str) -> str:
        """A signed, expiring bypass cookie value for ``tenant``."""
        expires = int(self._now().timestamp()) + self.cookie_max_age
        payload = f"{tenant or ALL_TENANTS}:{expires}"
        return f"{payload}:{self._sign(secret, payload)}"

    def _valid_cookie(self, value: str, tenant: str | None, secret: str) -> bool:
        parts = value.rsplit(":", 2)
        if len(parts) != 3:
            return False
        cookie_tenant, expires, signature = parts
        if not (expires.isascii() and expires.isdigit()):
            return False
        expected = self._sign(secret, f"{cookie_tenant}:{expires}")
        if not hmac.compare_digest(signature.encode("latin-1"), expected.encode("ascii")):
            return False
        if cookie_tenant != (tenant or ALL_TENANTS):
            return False
        try:
            return int(expires) > self._now().timestamp()
        except ValueError:
            return False

    def _redeem(self, request: RequestView, tenant: str | None, secret: str) -> Response | bool:
        try:
            pairs = parse_qsl(request.query[:MAX_QUERY_LENGTH], keep_blank_values=True, max_num_fields=100)
        except ValueError:  # more fields than we read: not a bypass
            return False
        given = next((v for k, v in pairs if k == QUERY), None)
        if given is None or not hmac.compare_digest(given.encode("utf-8"), secret.encode("utf-8")):
            return False
        if request.method not in ("GET", "HEAD"):
            return True
        # A query-only reference: the same path (whatever the mount point), never another host,
        # and nothing decoded from the request goes back into a header.
        location = "?" + urlencode([(k, v) for k, v in pairs if k != QUERY])
        secure = "; Secure" if request.scheme in ("https", "wss") else ""
        cookie = (
            f"{COOKIE}={self.cookie_value(tenant, secret)}; Max-Age={self.cookie_max_age}; Path=/; "
            f"HttpOnly; SameSite=Lax{secure}"
        )
        headers = [
            ("location", location),
            ("set-cookie", cookie),
            ("cache-control", "no-store"),
            ("content-length", "0"),
        ]
        return Response(302, headers, b"")


def _cookie(header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a Cookie header, without parsing the rest."""
    if not header or name not in header:
        return None
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value.strip().strip('"')
    return None
