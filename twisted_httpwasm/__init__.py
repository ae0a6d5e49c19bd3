"""twisted-httpwasm: run http-wasm middleware guests in front of twisted.web resources.

Three lines put a guest in front of a resource::

    from twisted_httpwasm import Guest, GuestResource
    guest = Guest.load("examples/router.wat")
    site = Site(GuestResource(guest, MyResource()))
"""

from ._drain import DrainService
from ._site import GuestSite
from .abi import BodyKind, Feature, HeaderKind, LogLevel
from .guest import Execution, Guest, GuestLoadError, GuestTrap, Mount
from .proxy import ProxyResource
from .resource import FailurePolicy, GuestResource

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
    "Mount",
    "ProxyResource",
]
