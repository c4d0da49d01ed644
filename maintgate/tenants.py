"""Tenant resolvers for the gate: from a header, a subdomain or a path prefix."""

from .core.tenants import (
    HeaderTenant,
    PathPrefixTenant,
    SubdomainTenant,
    TenantResolver,
    from_header,
    from_path_prefix,
    from_subdomain,
)

__all__ = [
    "HeaderTenant",
    "PathPrefixTenant",
    "SubdomainTenant",
    "TenantResolver",
    "from_header",
    "from_path_prefix",
    "from_subdomain",
]
