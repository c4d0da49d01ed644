"""Tenant resolvers for the gate: from a header, a subdomain or a path prefix, or the first of several."""

from .core.tenants import (
    FirstOf,
    HeaderTenant,
    PathPrefixTenant,
    SubdomainTenant,
    TenantResolver,
    first_of,
    from_header,
    from_path_prefix,
    from_subdomain,
)

__all__ = [
    "FirstOf",
    "HeaderTenant",
    "PathPrefixTenant",
    "SubdomainTenant",
    "TenantResolver",
    "first_of",
    "from_header",
    "from_path_prefix",
    "from_subdomain",
]
