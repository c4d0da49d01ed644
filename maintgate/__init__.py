"""maintgate: per-tenant maintenance mode for multi-tenant web apps.

A cached, SQL-backed gate for ASGI and WSGI apps that answers tenants under
maintenance with a 503 that fits the client, and a migration window that switches
maintenance off in the same transaction as the migration.
"""

from .asgi import MaintenanceMiddleware
from .core.errors import InvalidArgument, InvalidTenant, MaintgateError, WindowBusy, WindowLost, WindowRefused
from .core.gate import Gate
from .core.render import Renderer
from .core.schema import metadata
from .core.state import ALL_TENANTS, Ended, HistoryEntry, MaintenanceState, Owner, Schedule, Window
from .core.store import MaintenanceStore
from .fleet import RolloutReport, rollout
from .migration import async_maintenance_window, maintenance_window
from .wsgi import WSGIMaintenanceMiddleware

__version__ = "0.1.0"

__all__ = [
    "ALL_TENANTS",
    "Ended",
    "Gate",
    "HistoryEntry",
    "InvalidArgument",
    "InvalidTenant",
    "MaintenanceMiddleware",
    "MaintenanceState",
    "MaintenanceStore",
    "MaintgateError",
    "Owner",
    "Renderer",
    "RolloutReport",
    "Schedule",
    "WSGIMaintenanceMiddleware",
    "Window",
    "WindowBusy",
    "WindowLost",
    "WindowRefused",
    "async_maintenance_window",
    "maintenance_window",
    "metadata",
    "rollout",
]
