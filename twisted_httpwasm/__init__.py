"""twisted-httpwasm: run http-wasm middleware guests in front of twisted.web resources.

Three lines put a guest in front of a resource::

    from twisted_httpwasm import Guest, GuestResource
    guest = Guest.load("examples/router.wat")
    site = Site(GuestResource(guest, MyResource()))
"""

from .abi import BodyKind, Feature, HeaderKind, LogLevel
from .runtime.calllog import LogLimit
from .runtime.guest import Execution, Guest, GuestLoadError, GuestTrap, Mount
from .web.drain import DrainService
from .web.proxy import ProxyResource
from .web.resource import FailurePolicy, GuestResource
from .web.site import GuestSite
from .web.wsgi import UnderscoreHeaderGuard

__all__ = [
    "BodyKind",
    "DrainService",
    "Execution",
    "FailurePolicy",
    "Feature",
    "Guest",
    "GuestLoadError",
    "GuestResource",
    "GuestSite",
    "GuestTrap",
    "HeaderKind",
    "LogLevel",
    "LogLimit",
    "Mount",
    "ProxyResource",
    "UnderscoreHeaderGuard",
]
