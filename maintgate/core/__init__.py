"""maintgate's framework-agnostic core: state, store, mirror, tenants, negotiation, rendering, gate.

It imports only the standard library, SQLAlchemy and cachetools.
"""

from .errors import InvalidTenant, MaintgateError
from .gate import ExemptPaths, Gate, Pending
from .mirror import MISS, StateMirror
from .negotiation import HTML, PROBLEM_JSON, TEXT, negotiate
from .render import Renderer
from .request import RequestView
from .response import Response
from .schema import DEFAULT_PREFIX, Tables, build_tables, metadata
from .state import ALL_TENANTS, MaintenanceState, is_valid_tenant
from .store import MaintenanceStore

__all__ = [
    "ALL_TENANTS",
    "DEFAULT_PREFIX",
    "HTML",
    "MISS",
    "PROBLEM_JSON",
    "TEXT",
    "ExemptPaths",
    "Gate",
    "InvalidTenant",
    "MaintenanceState",
    "MaintenanceStore",
    "MaintgateError",
    "Pending",
    "Renderer",
    "RequestView",
    "Response",
    "StateMirror",
    "Tables",
    "build_tables",
    "is_valid_tenant",
    "metadata",
    "negotiate",
]
