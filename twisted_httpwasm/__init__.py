"""twisted-httpwasm: run http-wasm middleware guests in front of twisted.web resources.

Three lines put a guest in front of a resource::

    from twisted_httpwasm import Guest, GuestResource
    guest = Guest.load("examples/router.wat")
    site = Site(GuestResource(guest, MyResource()))
"""

from .abi import BodyKind, Feature, HeaderKind, LogLevel
from .runtime.calllog import LogLimit
from .runtime.guest import Execution, Guest, GuestLoadError, GuestTrap, Mount
from .service.stopping import DrainService
from .web.access_log import RequestLog
from .web.metrics import GuestMetrics
from .web.proxy import ProxyResource
from .web.resource import FailurePolicy, GuestResource
from .web.site import GuestSite
from .web.tracing import GuestTracing
from .web.wsgi import UnderscoreHeaderGuard

__all__ = [
    "BodyKind",
    "DrainService",
    "Execution",
    "FailurePolicy",
    "Feature",
    "Guest",
    "GuestLoadError",
    "GuestMetrics",
    "GuestResource",
    "GuestSite",
    "GuestTracing",
    "GuestTrap",
    "HeaderKind",
    "LogLevel",
    "LogLimit",
    "Mount",
    "ProxyResource",
    "RequestLog",
    "UnderscoreHeaderGuard",
]
